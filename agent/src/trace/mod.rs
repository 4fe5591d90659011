//! Spans from socket events: [`stitch`] follows connections and links spans; [`process`]
//! describes the processes they come from.

pub mod process;
pub mod stitch;

pub use stitch::{Link, Span, Stitcher};
