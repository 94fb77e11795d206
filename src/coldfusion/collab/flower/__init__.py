"""ColD Fusion on Flower, laid out like Flower's example apps.

- `messages.py`: what travels (the base body out; a contributor's body, statistics and
  example count back). Data and task heads never leave a node.
- `client_app.py`: the ClientApp. A SuperNode is one contributor: its task comes from the
  node config (`task`), or in simulation from its partition of the run's tasks; its head
  lives in the node's state across rounds.
- `strategy.py`: `ColdFusionStrategy`, Flower's FedAvg with aggregation replaced by our
  fusion operators over bodies (any `fusion.method`, statistics included).
- `engine.py`: `FlowerEngine`, the loop's engine on a Flower Grid: one loop iteration is
  one Flower round.
- `server_app.py`: the ServerApp: the ColD Fusion loop with the FlowerEngine.
- `simulation.py`: run it all on this machine with Flower's simulation runtime.

Flower itself is imported only by these modules, so the local engine never needs it.
"""
