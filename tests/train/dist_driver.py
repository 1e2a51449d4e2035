"""Run several tunelab configs one after another in ONE torchrun launch (starting ranks costs seconds each).

    torchrun --nproc-per-node 2 tests/train/dist_driver.py SPEC.json

SPEC: [{"config": path, "overrides": [...], "stop_after": int | null, "samplers": {name: "module:Class"}} |
{"compare": sweep.yaml}, ...] ("samplers": test samplers registered in `rl.sampler.SAMPLERS` first). Each rank also appends the prompts
it sampled in every rollout round to ``<output_dir>/prompts-rank<R>.jsonl`` (test evidence, not a tunelab
file), and a run that raises TunelabError is recorded in ``<output_dir>.error`` instead of ending the launch.
"""

import json
import sys

import torch


def main(spec_path: str) -> None:
    from tunelab.objectives import load_run_config
    from tunelab.errors import TunelabError
    from tunelab.rl.rollout import RolloutSource
    from tunelab.train import distributed
    from tunelab.train.launch import train

    torch.set_num_threads(1)
    distributed.init()
    original = RolloutSource.round_prompts

    def recording(self, r):
        prompts = original(self, r)
        with open(f"{self.ctx.run_dir}/prompts-rank{self.ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps({"round": r, "prompts": [p.prompt for p in prompts]}) + "\n")
        return prompts

    RolloutSource.round_prompts = recording
    for job in json.loads(open(spec_path).read()):
        if "compare" in job:  # `tunelab compare` under torchrun: variants one after another
            from tunelab.lab.compare import compare_main

            compare_main(job["compare"])
            distributed.barrier()
            continue
        for name, path in job.get("samplers", {}).items():  # a test sampler, "module:Class"
            import importlib

            from tunelab.rl.sampler import SAMPLERS

            module, cls = path.split(":")
            SAMPLERS[name] = getattr(importlib.import_module(module), cls)
        cfg = load_run_config(job["config"], job.get("overrides", []))
        try:
            train(cfg, stop_after=job.get("stop_after"))
        except TunelabError as e:
            if distributed.is_main():
                open(cfg.output_dir + ".error", "w").write(str(e))
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
