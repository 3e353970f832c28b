//! The servers' HTTP request reader (`tollgate::servers::http::read_head`) on arbitrary bytes,
//! driven by a current-thread runtime over an in-memory stream: an error or a head, never a
//! panic, and never more read than the limit allows.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use tollgate::servers::http::{HeadError, Limits, ReadError, read_head};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

const LIMITS: Limits = Limits {
    max_bytes: 2048,
    timeout: Duration::from_secs(5),
};

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    match runtime().block_on(read_head(&mut stream, LIMITS)) {
        Ok(head) => assert!(head.method.len() + head.path.len() <= LIMITS.max_bytes),
        Err(HeadError::Read(ReadError::TooLarge(n))) => assert!(data.len() > n),
        Err(_) => {}
    }
});
