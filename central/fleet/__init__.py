"""Fleet management (issue 17, SPEC §9): signed model bundles, each gateway's desired state, staged rollouts."""
