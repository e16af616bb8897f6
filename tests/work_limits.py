"""The clock limit tests give the optimizer: far above any run's length, so a loaded CI machine
never decides a test's result. Work limits (iterations, e-nodes) are what bound each test's runs;
seconds stays a safety net against a hang (tests/test_limits.py tests the clock limit itself)."""

SAFETY_NET_S = 600.0
