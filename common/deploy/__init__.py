"""Real deployments: PKI (CA, SuperLink certificate, SuperNode keys) and the Flower command lines."""
