//! Guides beyond one item, the same pages as `docs/` in the repository: the reference tables
//! ([`reference`](mod@reference)), the operator's guide ([`operations`]) and the benchmarks ([`benchmarks`]).

#[doc = include_str!("../docs/reference.md")]
pub mod reference {}

#[doc = include_str!("../docs/operations.md")]
pub mod operations {}

#[doc = include_str!("../docs/benchmarks.md")]
pub mod benchmarks {}
