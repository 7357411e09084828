//! Fuzzes the API's request parser (method, path, body from any HTTP client of the daemon's
//! socket): it never panics, and whatever it accepts renders back to a request that parses to
//! the same thing.
#![no_main]

use ddvmm::daemon::api::model::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // method \n path \n body
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    let Ok(req) = Request::from_http(&method, &path, body) else {
        return;
    };
    let h = req.to_http();
    let again = Request::from_http(
        h.method.as_str(),
        &h.path,
        h.body.as_deref().unwrap_or_default(),
    );
    assert_eq!(again.ok(), Some(req), "{h:?}");
});
