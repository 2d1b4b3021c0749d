#!/usr/bin/env bash
# Long runs of the property tests: everything that parses input from the network or from
# disk (WireGuard datagrams, enrollment JSON and CSRs, broker headers and CONNECT targets,
# the events stream's Last-Event-ID, the agent's config and state files) under random input, and the concentrator's state
# machine against its model. `cargo test` runs the same tests with a few hundred cases each;
# this runs PROPTEST_CASES cases each (default 100000), optimised but with overflow checks
# and debug assertions kept. On 2 cores: about 4 minutes of release build the first time,
# then about 5 minutes of tests at the default count.
#
#   benches/fuzz.sh                                         # all property tests
#   PROPTEST_CASES=1000000 benches/fuzz.sh wg::proptests   # more cases, some tests
#
# A failure prints the minimal failing input, and proptest saves its seed under the crate's
# proptest-regressions/, from where every later `cargo test` replays it first.
set -euo pipefail
cd "$(dirname "$0")/.."

export PROPTEST_CASES="${PROPTEST_CASES:-100000}"
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true

echo "fuzz: ${PROPTEST_CASES} cases per property test" >&2
# Every property test lives in a module named `proptests`; arguments are test-name filters.
cargo test --release --locked --no-fail-fast --lib \
    -p floto-vpn-server -p floto-proto -p floto-tunnel-client \
    -- "${@:-proptests}"
