"""``mfo-actors demo``: a real instance receiving, storing and delivering webhooks, on loopback.

The reference MFO server, the production daemon (as a child process), simulated providers
with retries, a forged signature, a malformed body and an upstream outage; a live view, a
summary and a verdict read from the server's records.
"""

from mfo_actors.demo._run import DemoOptions as DemoOptions
from mfo_actors.demo._run import Verdict as Verdict
from mfo_actors.demo._run import run_demo as run_demo

__all__ = ["DemoOptions", "Verdict", "run_demo"]
