"""``nnunetv2-proto benchmark-heads``: training-step time, peak memory and inference time per patch.

Every trainer is measured in a fresh process (so CPU peak memory can be attributed), built
from the dataset's real plans exactly as ``nnUNetv2_train`` builds it: the trainer class
(found through nnU-Net's lookup), its network, optimiser, nnU-Net loss and -- for the
prototype trainers -- its objective. Only the data differ: synthetic batches of the plans'
patch and batch size, so full-size configurations can be benchmarked before (or without)
preprocessing. The timed step is the trainer's own ``train_step`` (forward, loss, backward,
optimiser, prototype EMA, teacher EMA) in each trainer's costliest phase (MPER with initialised
prototypes, semi-supervised trainers in self-training: each family's ``enter_steady_state``). Results are medians
over repeats after warm-up, taken round-robin across trainers, with ratios to the baseline
measured in the same run.

Peak memory on a GPU is CUDA's ``max_memory_allocated``. A CPU has no allocator statistics, and
the peak RSS of a process running under glibc's defaults measures the allocator's cache as much
as the tensors: freed blocks below a threshold that glibc raises as it goes stay mapped, so
the same trainer read 742-895 MB from run to run. On a CPU each trainer is therefore measured
again afterwards in a fresh process whose malloc returns every allocation above 128 KiB to the
system when it is freed (``MALLOC_MMAP_THRESHOLD_``, which also stops the threshold from
moving): its peak RSS growth over a few training steps is the peak of live memory, the same
figure to within 0.1 MB on repeats. That setting slows allocation, so it is not used while timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from nnunetv2_proto.training.semi_supervised import SemiSupervisedMixin
from nnunetv2_proto.training.trainer_base import ExtensibleTrainerMixin


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic_labels(dataset_json: dict, num_classes: Optional[int]) -> dict:
    if num_classes is None:
        return dataset_json
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}}
    return {**dataset_json, "labels": labels}


def prepare_like_initialize(trainer) -> None:
    """What nnUNetTrainer.initialize does, minus reading preprocessed data (and DDP/compile)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    trainer._set_batch_size_and_oversample()
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              trainer.dataset_json)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(trainer.device)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    if isinstance(trainer, ExtensibleTrainerMixin):  # the plugin's trainers wrap nnU-Net's loss in an objective
        trainer.objective = trainer.build_objective()
    trainer.was_initialized = True


def synthetic_batch(trainer, generator: torch.Generator) -> dict:
    patch = list(trainer.configuration_manager.patch_size)
    manager = trainer.label_manager
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *patch, generator=generator)
    labels = torch.randint(0, len(manager.all_labels), (trainer.batch_size, 1, *patch), generator=generator)
    label_values = torch.tensor(sorted(manager.all_labels))
    seg = label_values[labels]
    if manager.has_regions:
        regions = [r if isinstance(r, (list, tuple)) else (r,) for r in manager.foreground_regions]
        seg = torch.cat([torch.isin(seg, torch.tensor(r)).float() for r in regions], 1)
    seg = seg.float()
    scales = trainer._get_deep_supervision_scales()
    if scales is None:
        return {"data": data, "target": seg}
    targets = [seg if all(s == 1 for s in scale) else
               torch.nn.functional.interpolate(seg, size=[round(p * s) for p, s in zip(patch, scale)],
                                               mode="nearest-exact") for scale in scales]
    return {"data": data, "target": targets}


class MeasuredTrainer:
    """One trainer set up for measurement inside its own process."""

    def __init__(self, trainer_name: str, plans_file: str, dataset_json_file: str, configuration: str,
                 num_classes: Optional[int], device_name: str, batch_size: Optional[int], results_dir: str):
        import contextlib
        import io
        import warnings
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        warnings.filterwarnings("ignore")
        self.device = torch.device(device_name)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
            plans = json.loads(Path(plans_file).read_text())
            if batch_size is not None:
                plans["configurations"][configuration]["batch_size"] = batch_size
            plans["continue_training"] = False
            dataset_json = synthetic_labels(json.loads(Path(dataset_json_file).read_text()), num_classes)
            os.environ["nnUNet_results"] = results_dir  # the trainer writes its log there, not in the user's folders
            self.trainer = trainer_class(plans, configuration, 0, dataset_json, self.device)
            prepare_like_initialize(self.trainer)
            if isinstance(self.trainer, ExtensibleTrainerMixin):
                self.trainer.enter_steady_state()  # e.g. MPER's prototypes initialised, a teacher self-training
        self.trainer.network.train()
        generator = torch.Generator().manual_seed(0)
        self.batches = [synthetic_batch(self.trainer, generator) for _ in range(2)]
        if isinstance(self.trainer, SemiSupervisedMixin):  # a labelled and an unlabelled stream
            self.batches = [{"labeled": self.batches[i], "unlabeled": self.batches[1 - i]} for i in range(2)]
        self.inference_input = synthetic_batch(self.trainer, generator)["data"][:1]
        self.calls = 0
        self.rss_before = _rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> float:
        self._sync()
        tick = time.perf_counter()
        self.trainer.train_step(self.batches[self.calls % 2])
        self._sync()
        self.calls += 1
        return time.perf_counter() - tick

    def inference(self) -> float:
        import contextlib
        self.trainer.set_deep_supervision_enabled(False)
        self.trainer.network.eval()
        x = self.inference_input.to(self.device)
        with torch.no_grad(), (torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()):
            self._sync()
            tick = time.perf_counter()
            self.trainer.network(x)
            self._sync()
            elapsed = time.perf_counter() - tick
        self.trainer.set_deep_supervision_enabled(True)
        self.trainer.network.train()
        return elapsed

    def summary(self) -> dict:
        peak = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss_before)
        trainer = self.trainer
        return {"num_outputs": trainer.label_manager.num_segmentation_heads,
                "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size,
                "peak_memory_bytes": int(peak),
                "memory_kind": ("CUDA max_memory_allocated" if self.device.type == "cuda"
                                else "CPU peak RSS growth during the measurements"),
                "parameters": sum(p.numel() for p in trainer.network.parameters())}


def add_trainer_arguments(parser: argparse.ArgumentParser, trainers_help: str) -> None:
    """The arguments every in-process measurement script takes: dataset, configuration, plans, trainers."""
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help=trainers_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def trainers_in_this_process(dataset: str, plans_name: str, device: str
                             ) -> Iterator[Tuple[str, Callable[[str, str, Optional[int]], MeasuredTrainer]]]:
    """(dataset folder name, build(trainer, configuration, num_classes) -> MeasuredTrainer) for scripts that
    measure trainers side by side in one process; the trainers' logs go to a temporary folder, and the
    caller's nnUNet_results is restored afterwards."""
    from nnunetv2_proto.environment import require_nnunet_folders, resolve_dataset_name
    folders = require_nnunet_folders(("nnUNet_preprocessed",))
    name = resolve_dataset_name(dataset)
    preprocessed = folders["nnUNet_preprocessed"] / name
    saved_results = os.environ.get("nnUNet_results")
    try:
        with tempfile.TemporaryDirectory() as results_dir:
            def build(trainer: str, configuration: str, num_classes: Optional[int] = None) -> MeasuredTrainer:
                return MeasuredTrainer(trainer, str(preprocessed / f"{plans_name}.json"),
                                       str(preprocessed / "dataset.json"), configuration, num_classes, device,
                                       None, results_dir)
            yield name, build
    finally:
        if saved_results is not None:
            os.environ["nnUNet_results"] = saved_results


def _serve(connection, *args) -> None:
    """Worker process: set one trainer up, then answer 'train' / 'infer' / 'summary' until 'stop'."""
    try:
        subject = MeasuredTrainer(*args)
        connection.send(("ready", None))
        while True:
            command = connection.recv()
            if command == "stop":
                break
            connection.send(("ok", {"train": subject.train_step, "infer": subject.inference,
                                    "summary": subject.summary}[command]()))
    except Exception as error:  # report set-up or step failures to the parent instead of hanging it
        import traceback
        connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        connection.close()


# malloc settings of the CPU memory pass (see the module docstring)
LIVE_MEMORY_MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
MEMORY_PASS_STEPS = 3


class _Worker:
    def __init__(self, context, trainer: str, *args, environment: Optional[Dict[str, str]] = None):
        self.trainer = trainer
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, trainer, *args), daemon=True)
        previous = {key: os.environ.get(key) for key in environment or {}}
        os.environ.update(environment or {})  # a spawned child reads the environment when it starts
        try:
            self.process.start()
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        self._expect()

    def _expect(self):
        status, value = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"benchmarking {self.trainer} failed: {value}")
        return value

    def ask(self, command: str):
        self.connection.send(command)
        return self._expect()

    def close(self) -> None:
        try:
            self.connection.send("stop")
        finally:
            self.process.join(timeout=60)


def benchmark_heads(dataset: str, configuration: str, trainers: Sequence[str], plans_name: str = "nnUNetPlans",
                    baseline: Optional[str] = None, num_classes: Optional[int] = None, steps: int = 5,
                    warmup: int = 2, device: Optional[str] = None, batch_size: Optional[int] = None,
                    output: Optional[Path] = None, sequential: bool = False, progress=print) -> dict:
    """Each trainer lives in its own process (memory is attributable); measurements are taken
    round-robin across trainers, so slow drifts of the machine's speed hit every trainer alike.
    ``sequential`` measures one trainer at a time instead, for sizes where several set-ups do not
    fit in memory together."""
    from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name
    folders = require_nnunet_folders(("nnUNet_preprocessed",))
    name = resolve_dataset_name(dataset)
    plans_file = folders["nnUNet_preprocessed"] / name / f"{plans_name}.json"
    dataset_json = folders["nnUNet_preprocessed"] / name / "dataset.json"
    if not plans_file.is_file() or not dataset_json.is_file():
        raise SetupError(f"{plans_file} or {dataset_json} is missing",
                         f"plan the dataset first: nnUNetv2_plan_and_preprocess -d {name} --no_pp")
    if configuration not in json.loads(plans_file.read_text())["configurations"]:
        raise SetupError(f"configuration '{configuration}' is not in {plans_file}",
                         "pick one of the plans' configurations (nnunetv2-proto plan-cpu adds 3d_cpu / 2d_cpu)")
    baseline = baseline or trainers[0]
    order = [baseline, *[t for t in trainers if t != baseline]]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    context = multiprocessing.get_context("spawn")
    workers: List[_Worker] = []
    timings: Dict[str, Dict[str, List[float]]] = {t: {"train": [], "infer": []} for t in order}
    summaries: Dict[str, dict] = {}

    def measure(group: List[_Worker]) -> None:
        for kind in ("train", "infer"):
            for repeat in range(warmup + steps):
                progress(f"  {kind} round {repeat + 1}/{warmup + steps}" + (" (warm-up)" if repeat < warmup else ""))
                for worker in group:
                    elapsed = worker.ask(kind)
                    if repeat >= warmup:
                        timings[worker.trainer][kind].append(elapsed)
        summaries.update({w.trainer: w.ask("summary") for w in group})

    def live_memory_pass(worker_args) -> None:
        for index, trainer in enumerate(order, start=1):
            progress(f"  peak live memory of {trainer} ({index}/{len(order)}, {MEMORY_PASS_STEPS} training steps)")
            worker = _Worker(context, trainer, *worker_args, environment=LIVE_MEMORY_MALLOC_ENVIRONMENT)
            try:
                for _ in range(MEMORY_PASS_STEPS):
                    worker.ask("train")
                summary = worker.ask("summary")
            finally:
                worker.close()
            summaries[trainer].update(peak_memory_bytes=summary["peak_memory_bytes"], memory_kind=(
                f"CPU peak RSS growth over {MEMORY_PASS_STEPS} training steps in a fresh process, with malloc "
                "returning freed allocations above 128 KiB to the system (live memory, not the allocator's cache)"))

    with tempfile.TemporaryDirectory() as results_dir:
        worker_args = (str(plans_file), str(dataset_json), configuration, num_classes, device, batch_size,
                       results_dir)
        try:
            for index, trainer in enumerate(order, start=1):
                progress(f"  setting up {trainer} ({index}/{len(order)})")
                workers.append(_Worker(context, trainer, *worker_args))
                if sequential:
                    measure(workers[-1:])
                    workers.pop().close()
            if not sequential:
                measure(workers)
        finally:
            for worker in workers:
                worker.close()
        if torch.device(device).type == "cpu":
            live_memory_pass(worker_args)
    results = []
    for trainer in order:
        results.append({"trainer": trainer, **summaries[trainer],
                        "train_step_s": statistics.median(timings[trainer]["train"]),
                        "train_step_all_s": timings[trainer]["train"],
                        "inference_per_patch_s": statistics.median(timings[trainer]["infer"]),
                        "inference_all_s": timings[trainer]["infer"]})
    base = results[0]
    for r in results:
        r["train_step_ratio"] = r["train_step_s"] / base["train_step_s"]
        r["inference_ratio"] = r["inference_per_patch_s"] / base["inference_per_patch_s"]
        r["memory_ratio"] = r["peak_memory_bytes"] / max(base["peak_memory_bytes"], 1)
    report = {"dataset": name, "configuration": configuration, "plans": plans_name, "device": device,
              "torch_threads": torch.get_num_threads(), "num_classes_override": num_classes, "steps": steps,
              "warmup": warmup, "schedule": "one trainer after another" if sequential else "round-robin across trainers",
              "results": results}
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def format_benchmark(report: dict) -> str:
    lines = [f"{report['dataset']} {report['configuration']} on {report['device']} "
             f"(K = {report['results'][0]['num_outputs']}, patch {report['results'][0]['patch_size']}, "
             f"batch {report['results'][0]['batch_size']}, median of {report['steps']} after {report['warmup']} warm-up)",
             "| trainer | train step (s) | x baseline | inference / patch (s) | x baseline | peak memory (MB) "
             "| x baseline | parameters |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| `{r['trainer']}` | {r['train_step_s']:.3f} | {r['train_step_ratio']:.2f} | "
                     f"{r['inference_per_patch_s']:.3f} | {r['inference_ratio']:.2f} | "
                     f"{r['peak_memory_bytes'] / 2 ** 20:.0f} | {r['memory_ratio']:.2f} | {r['parameters']:,} |")
    lines.append(f"peak memory: {report['results'][0]['memory_kind']}")
    return "\n".join(lines)
