//! floto-bench
