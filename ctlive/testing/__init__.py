"""Test support that ships with ctlive, for its own tests and for users' (as
``trio.testing`` does). Importing this package imports none of its modules and has
no side effects; import what you need from them:

- ``ctlive.testing.workloads``: sample workloads for real migrations on this machine
  (``SampleService``, a TCP service in its own namespaces with a checking client;
  ``start_sample_workload``, a counter; ``script_pids``), running the program
  ``scripts/sample_workload.py`` shipped as package data;
- ``ctlive.testing.doubles``: ``FakeProvider`` and ``FakeVerifier``, attestation
  doubles with no platform (they still check the report_data binding), and
  ``FakeDestination``, a session handler playing a one-iteration destination;
- ``ctlive.testing.hooks``: ``FaultHooks``, for ``serve(hooks=...)``, which runs a
  function when the receiver reaches a named stage (``STAGES``), e.g. to break it
  there;
- ``ctlive.testing.memory``: ``memory_dir``, a directory on a tmpfs of its own for a
  receiver's state (a receiver refuses a disk), and ``HIDE_MEMORY``, the shell prefix
  that keeps that tmpfs out of a workload's mount namespace (and so out of its dumps).
"""
