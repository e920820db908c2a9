"""Host side: device driver, Verilator harness launcher, offload plugin (planned)."""
