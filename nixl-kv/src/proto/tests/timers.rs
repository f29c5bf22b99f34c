//! The prefill core's `poll_timeout`: the driver sleeps until it instead of guessing a tick, so
//! it must name every deadline `handle_timeout` acts on, and none that has passed.

use super::*;
use crate::proto::prefill::DEFAULT_PEER_IDLE_TIMEOUT;

#[test]
fn poll_timeout_names_the_next_orphan_expiry_then_the_idle_decode_then_nothing() {
    let now = Instant::now();
    let s = Duration::from_secs(1);
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv);
    let idle = now + DEFAULT_PEER_IDLE_TIMEOUT;
    assert_eq!(
        p.poll_timeout(),
        Some(idle),
        "the registered decode's idle deadline"
    );

    p.handle_inbound(info(20, "d0", &[1], 1), now + s);
    let orphan = now + s + Duration::from_secs(300);
    assert_eq!(p.poll_timeout(), Some(orphan));

    // Touched again later: the deadline it names may be early, never late.
    p.handle_inbound(info(20, "d0", &[1], 1), now + 2 * s);
    assert!(p.poll_timeout() <= Some(orphan + s));

    // Woken early: nothing expires, and the exact deadline is named.
    assert_eq!(p.handle_timeout(orphan), 0);
    assert_eq!(p.poll_timeout(), Some(orphan + s));
    assert_eq!(p.handle_timeout(orphan + s), 1);
    // The decode was last seen with the second info.
    let idle = now + 2 * s + DEFAULT_PEER_IDLE_TIMEOUT;
    assert_eq!(
        p.poll_timeout(),
        Some(idle),
        "the room is gone; the decode is idle"
    );

    assert_eq!(p.handle_timeout(idle), 0);
    assert!(!p.has_peer(&agent("d0")));
    assert_eq!(p.poll_timeout(), None);
}

#[test]
fn a_decode_that_rooms_still_name_is_looked_at_again_not_at_once() {
    let now = Instant::now();
    let mut drv = FakeDriver::new();
    let mut p = prefill_with_peer(now, &mut drv).with_peer_idle_timeout(Duration::from_secs(5));
    p.sender_new(RoomId::new(7), now);
    p.handle_inbound(info(7, "d0", &[1], 1), now);
    let late = now + Duration::from_secs(6);
    assert_eq!(p.handle_timeout(late), 0);
    assert!(p.has_peer(&agent("d0")), "a room names it");
    // Its idle deadline passed; the next look is a while later, never in the past.
    let next = p.poll_timeout().unwrap();
    assert!(next > late, "{next:?} is not after {late:?}");
    p.release(RoomId::new(7));
    assert_eq!(p.handle_timeout(next), 0);
    assert!(!p.has_peer(&agent("d0")));
}
