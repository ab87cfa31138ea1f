"""`leap run`: a TrainingRun on this machine, no cluster.

The run goes through the operator's own validation and rendering; each worker of the rendered
Job becomes a local process with the env its pod would get (local addresses and free ports
substituted), supervised with the cluster's gang-restart policy.

Modules, one job each:
  overrides    --set PATH=VALUE on the loaded YAML
  devices      which accelerator this machine can actually offer
  ports        free TCP ports for rendezvous and metrics
  podenv       a pod template's env, resolved the way the kubelet would (downward API, $(VAR))
  plan         rendered Job -> one WorkerPlan per completion index, with local substitutions
  rundir       the local run directory (checkpoints, logs, pid files, summaries)
  supervisor   start/stop process groups, attempts, restarts with backoff, signals
  scrape       a worker's /metrics -> progress dict
  display      live progress (rich on a TTY, plain lines otherwise) and the final summary table
  cmd_run      the CLI glue
"""
