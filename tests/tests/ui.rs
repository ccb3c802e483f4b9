//! Compile-time errors: every invalid declaration points at the argument at fault and says what
//! would be valid, and a wrong input shape does not compile.
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/*.rs");
}
