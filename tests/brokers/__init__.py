"""Real brokers for the tests, started on free ports of 127.0.0.1 and stopped after."""
