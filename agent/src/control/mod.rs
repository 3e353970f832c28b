//! The control socket: one JSON request line from the CLI, one JSON response line back.
//! Only root and the configured group may connect (the socket is 0660 and every peer is
//! checked again by SO_PEERCRED).

pub mod client;
pub mod peer;
pub mod protocol;
pub mod reply;
