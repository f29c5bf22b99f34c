//! Simulated prefill/decode pairs over the sans-IO core.
