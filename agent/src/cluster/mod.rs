//! The cluster as this agent sees it, and the decisions made from it. Pure: no sockets, no
//! clock, no chitchat types; inputs in, values out.

pub mod routing;
pub mod snapshot;
