"""One-machine wiring: phantom data, multi-site simulation, paper reproduction."""
