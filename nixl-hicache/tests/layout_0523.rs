//! SGLang 0.5.23's file layout ([`Naming::Bucketed`]) and pages made of several host ranges
//! ([`PageObject`]): the files are where and what SGLang 0.5.23's HiCacheNixl reads, a gathered
//! object is its ranges one after another, and a read scatters it back. Needs the NIXL runtime.
#![cfg(feature = "nixl-runtime-tests")]
#![allow(clippy::unwrap_used, reason = "test code")]

use nixl_core::HostBuffer;
use nixl_hicache::{
    HiCache, HiCacheConfig, KeySuffix, Naming, PageObject, PagePart, Plugin, RawTarget, bucket_of,
    page_key,
};
use nixl_testkit::{pattern, tempdir};

const RUN: u64 = 4096;

fn open(dir: &std::path::Path, model: &str) -> HiCache {
    HiCache::new(
        HiCacheConfig::new(Some(dir.to_path_buf()), Plugin::parse("POSIX"))
            .suffix(Some(KeySuffix::Mha {
                model: model.into(),
                tp_rank: 0,
                tp_size: 1,
            }))
            .naming(Naming::Bucketed),
    )
    .unwrap()
}

fn range(base: u64, i: u64) -> RawTarget {
    RawTarget {
        addr: base + i * RUN,
        len: RUN,
    }
}

#[test]
fn objects_are_sglang_0523_files_and_gathered_pages_scatter_back() {
    let dir = tempdir().unwrap();
    let cache = open(dir.path(), "org-M");
    let mut src = cache
        .register_buffer(HostBuffer::new(8 * RUN as usize).unwrap())
        .unwrap();
    pattern::fill(src.buffer_mut().as_mut_slice(), 23);
    let dst = cache
        .register_buffer(HostBuffer::new(8 * RUN as usize).unwrap())
        .unwrap();
    let (s, d) = (src.region().addr, dst.region().addr);
    let k1 = page_key(&[1], None);
    let k2 = page_key(&[2], None);

    // Page 1 as K and V objects (ranges 0 and 1); page 2 gathered from ranges 5, 2 and 7.
    let (r0, r1) = ([range(s, 0)], [range(s, 1)]);
    let gathered = [range(s, 5), range(s, 2), range(s, 7)];
    let set = [
        PageObject {
            key: &k1,
            part: PagePart::K,
            ranges: &r0,
        },
        PageObject {
            key: &k1,
            part: PagePart::V,
            ranges: &r1,
        },
        PageObject {
            key: &k2,
            part: PagePart::Whole,
            ranges: &gathered,
        },
    ];
    assert_eq!(
        cache
            .batch_exists_parts(&[&k1, &k2], &[PagePart::K, PagePart::V])
            .unwrap(),
        0
    );
    cache.batch_set_objects(&set).unwrap();

    let bytes = src.buffer().as_slice();
    let run = |i: usize| &bytes[i * RUN as usize..(i + 1) * RUN as usize];
    for (key, part, want) in [
        (&k1, "_k", run(0).to_vec()),
        (&k1, "_v", run(1).to_vec()),
        (&k2, "", [run(5), run(2), run(7)].concat()),
    ] {
        let name = format!("{key}_org-M_0_1{part}");
        let path = dir.path().join(bucket_of(&name)).join(&name);
        assert_eq!(std::fs::read(&path).unwrap(), want, "{}", path.display());
    }
    assert_eq!(
        cache
            .batch_exists_parts(&[&k1, &k2], &[PagePart::K, PagePart::V])
            .unwrap(),
        1
    );
    assert_eq!(
        cache
            .batch_exists_parts(&[&k2], &[PagePart::Whole])
            .unwrap(),
        1
    );

    // Read back elsewhere: K, V and the gathered page scattered into ranges 3, 0, 6 of `dst`.
    let (w0, w1) = ([range(d, 1)], [range(d, 4)]);
    let scattered = [range(d, 3), range(d, 0), range(d, 6)];
    let missing = page_key(&[3], None);
    let get = [
        PageObject {
            key: &k1,
            part: PagePart::K,
            ranges: &w0,
        },
        PageObject {
            key: &k1,
            part: PagePart::V,
            ranges: &w1,
        },
        PageObject {
            key: &missing,
            part: PagePart::Whole,
            ranges: &[],
        },
        PageObject {
            key: &k2,
            part: PagePart::Whole,
            ranges: &scattered,
        },
    ];
    assert_eq!(
        cache.batch_get_objects(&get).unwrap(),
        [true, true, false, true]
    );
    let back = dst.buffer().as_slice();
    let out = |i: usize| &back[i * RUN as usize..(i + 1) * RUN as usize];
    assert_eq!(out(1), run(0));
    assert_eq!(out(4), run(1));
    assert_eq!(
        [out(3), out(0), out(6)].concat(),
        [run(5), run(2), run(7)].concat()
    );

    // A foreign file in a bucket survives `clear`; ours go.
    let foreign = dir.path().join(bucket_of("x")).join("x");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, b"not ours").unwrap();
    assert_eq!(cache.clear().unwrap(), 3);
    assert!(foreign.is_file());
    assert_eq!(cache.batch_exists_parts(&[&k1], &[PagePart::K]).unwrap(), 0);
}

#[test]
fn another_models_bucketed_files_are_not_ours() {
    let dir = tempdir().unwrap();
    let a = open(dir.path(), "a");
    let b = open(dir.path(), "b");
    let mut buf = a
        .register_buffer(HostBuffer::new(RUN as usize).unwrap())
        .unwrap();
    pattern::fill(buf.buffer_mut().as_mut_slice(), 7);
    let k = page_key(&[9], None);
    let r = [range(buf.region().addr, 0)];
    a.batch_set_objects(&[PageObject {
        key: &k,
        part: PagePart::K,
        ranges: &r,
    }])
    .unwrap();
    assert_eq!(b.batch_exists_parts(&[&k], &[PagePart::K]).unwrap(), 0);
    assert_eq!(b.clear().unwrap(), 0, "model b cleared model a's page");
    assert_eq!(a.batch_exists_parts(&[&k], &[PagePart::K]).unwrap(), 1);
}

#[test]
fn direct_writes_land_the_same_bytes_and_unaligned_ones_stay_buffered() {
    let dir = tempdir().unwrap();
    let cache = HiCache::new(
        HiCacheConfig::new(Some(dir.path().to_path_buf()), Plugin::parse("POSIX"))
            .naming(Naming::Bucketed)
            .direct_io(true),
    )
    .unwrap();
    let mut src = cache
        .register_buffer(HostBuffer::new(4 * RUN as usize).unwrap())
        .unwrap();
    pattern::fill(src.buffer_mut().as_mut_slice(), 5);
    let dst = cache
        .register_buffer(HostBuffer::new(4 * RUN as usize).unwrap())
        .unwrap();
    let (s, d) = (src.region().addr, dst.region().addr);
    let (aligned, odd) = (page_key(&[1], None), page_key(&[2], None));
    // One page of two aligned runs (direct where the file system takes it), one of an odd length.
    let two = [range(s, 0), range(s, 1)];
    let short = [RawTarget {
        addr: s + 2 * RUN,
        len: 100,
    }];
    cache
        .batch_set_objects(&[
            PageObject {
                key: &aligned,
                part: PagePart::Whole,
                ranges: &two,
            },
            PageObject {
                key: &odd,
                part: PagePart::Whole,
                ranges: &short,
            },
        ])
        .unwrap();
    let back = [range(d, 2), range(d, 0)];
    let back_short = [RawTarget {
        addr: d + 3 * RUN,
        len: 100,
    }];
    let hits = cache
        .batch_get_objects(&[
            PageObject {
                key: &aligned,
                part: PagePart::Whole,
                ranges: &back,
            },
            PageObject {
                key: &odd,
                part: PagePart::Whole,
                ranges: &back_short,
            },
        ])
        .unwrap();
    assert_eq!(hits, [true, true]);
    let (a, b) = (src.buffer().as_slice(), dst.buffer().as_slice());
    let r = RUN as usize;
    assert_eq!(&b[2 * r..3 * r], &a[..r]);
    assert_eq!(&b[..r], &a[r..2 * r]);
    assert_eq!(&b[3 * r..3 * r + 100], &a[2 * r..2 * r + 100]);
}
