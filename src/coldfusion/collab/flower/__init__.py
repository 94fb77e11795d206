"""ColD Fusion on Flower, laid out like Flower's example apps.

- `messages.py`: what travels: the base and the consortium's settings down; a
  contributor's body, statistics and example count (or its decline), and its scores of
  each base, up. Data, labels, task specs, paths and heads never leave a node.
- `client_app.py`: the ClientApp. A SuperNode is one contributor: its task, model copy,
  device, threads and head directory come from its node config (in simulation, from the
  run's one YAML file through `client_app_for`); it trains, scores, or declines.
- `strategy.py`: `ColdFusionStrategy`, Flower's FedAvg with aggregation replaced by our
  fusion operators over bodies (any `fusion.method`, statistics included).
- `engine.py`: `FlowerEngine`, the loop's engine on a Flower Grid: one loop iteration is
  one Flower round of training and one of evaluation.
- `server_app.py`: the ServerApp: the ColD Fusion loop with the FlowerEngine.
- `simulation.py`: run it all on this machine with Flower's simulation runtime.
- `deployment.py`: the Flower app for `flwr run`, a one-file config cut into the
  server's and the nodes' parts, and a loopback federation of real processes.

Flower itself is imported only by these modules, so the local engine never needs it.
"""
