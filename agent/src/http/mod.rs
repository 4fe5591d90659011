//! HTTP/1.x: message framing over captured calls ([`framing`]), the trace context requests
//! carry ([`context`]), and what a span says about an exchange ([`attributes`]).

pub mod attributes;
pub mod context;
pub mod framing;
pub mod routes;

#[cfg(test)]
mod tests;
