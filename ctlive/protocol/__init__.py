"""The pure protocol layer: no sockets, no clocks, no files.

``noise`` (the Noise Protocol Framework), ``handshake`` (the attested handshake on top
of it), ``evidence`` (what attestation providers and verifiers exchange), ``records``
(AEAD records with sequence numbers, rekeying and an explicit end), ``frames`` (the
wire events and their codec), ``conversation`` (the state table every frame is
checked against) and ``lanes`` (connection preambles, lane keys and the merge of many
lanes into one order). Everything here is deterministic and tested without I/O.
"""
