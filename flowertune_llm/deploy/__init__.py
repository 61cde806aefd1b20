"""Running on Flower's Deployment Engine: certificates and keys, a local federation, the node's worker.

``certificates.py`` (TLS and SuperNode keys) · ``processes.py`` (finding and stopping what we started)
· ``cli_config.py`` (the ``flwr`` CLI's connections) · ``federation.py`` (a SuperLink and SuperNodes on
127.0.0.1) · ``commands.py`` (``flowertune-llm federation|certs|keys``) · ``worker.py`` (a SuperNode's
persistent worker that keeps the model loaded across rounds).
"""
