//! `vissl-operator`: placeholder until the controller lands (issue 6).
fn main() {}
