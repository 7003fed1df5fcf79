"""Test support that ships with ctlive, for its own tests and for users' (as
``trio.testing`` does): sample workloads, test doubles and fault hooks."""
