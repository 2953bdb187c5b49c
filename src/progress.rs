//! Progress of a long operation (a capture, a verification), as the library reports it to
//! its caller; the protocol carries it to vmarctl unchanged (`Reply::Progress`). A leaf: the
//! domain modules report progress without importing the wire.

use serde::{Deserialize, Serialize};

/// Progress of a long operation, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}
