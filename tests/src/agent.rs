//! A device running the real `floto-tunnel run` agent in a network namespace.
