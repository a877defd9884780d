"""The lifecycle: one Ray DAG from raw text to a live endpoint, cached, resumable, with lineage.

    herd run --config configs/default.yaml [--force STAGE ...]
    python -m flows.lifecycle --config configs/default.yaml      # what the KubeRay RayJob runs
    herd lineage models:/herd@champion

Stages (in order): data, pretrain, sft, rs, dpo, ppo, eval, register, promote, deploy. Each is
switched on or off in the config (`stages.<name>.enabled`) and runs as a Ray task with the
resources of `stages.<name>.resources`; the graph is built with `ray.dag` (`.bind()` and one
`.execute()`). A stage's inputs are named slots, each filled by the first enabled stage of a
preference list (SFT takes its model from pretrain, or the base model when pretraining is off).

Step caching. A step's key is sha256 of its stage name, its resolved stage config, the digests of
its input artifacts and its code version (sha256 of the source files the stage names). Every step
is an MLflow child run of one parent lifecycle run, tagged with `herd.step.key`, its inputs and
outputs. A finished step is found again by its key (an MLflow search, no other database); it is a
hit when its outputs are still valid (files there, model version there, endpoint answering). The
driver plans the hits before starting Ray: a rerun of the same config is answered from MLflow
without starting Ray at all. A failed or killed step has no finished run, so the next run resumes
at that step (pretraining also resumes from its last checkpoint: a step's folder is named by its
key). `--force STAGE` reruns that stage and every stage downstream of it.

Lineage. Each step's result carries the lineage of its inputs plus what it adds (data prep: the
raw-input sha256 and the packed-data manifest digest); the register and deploy steps write it as
tags `herd.lineage.*` with the lifecycle's config hash, git sha and parent run id.

Modules: config (the lifecycle YAML: load, validate, hash), plan (stages, wiring, step keys and the
cache lookup), record (the MLflow parent and child runs; LifecycleRun), step (one step as a Ray
task), run (the driver and its ray.dag), stages (the stage bodies), lineage (tags and the chain
back), cli (`herd run`, `herd lineage`), __main__ (`python -m flows.lifecycle`).
"""
