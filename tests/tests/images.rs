//! The image builder's own logic, without the network: `guest-images/tests/*.sh` (version
//! choice from one suite, requested binaries over busybox applets).

use ddvmm_tests::repo_root;

#[test]
fn image_builder_library_choice_and_applet_override() {
    let script = repo_root().join("guest-images/tests/sharedlibs-test.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run bash");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {text}", script.display());
    assert!(text.contains("sharedlibs-test: ok"), "{text}");
}
