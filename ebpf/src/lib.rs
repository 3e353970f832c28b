//! Empty on purpose: the program lives in `main.rs`. This library target exists so that the
//! agent can name this crate as a build-dependency (cargo then rebuilds the agent when the
//! program's sources change); it builds on the host with stable Rust.
#![no_std]
