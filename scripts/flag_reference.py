"""docs/flags.md, generated from the scripts' own parsers: every flag of main_dino.py, eval_knn.py, eval_linear.py,
visualize_sparo.py and run_with_submitit.py, grouped as their ``--help`` groups them, with its default and help.

    python scripts/flag_reference.py            # print the reference (markdown)
    python scripts/flag_reference.py --write    # write it to docs/flags.md
    python scripts/flag_reference.py --check    # exit 1 when docs/flags.md is not what the parsers give

tests/test_docs.py runs the check, so a parser change without ``--write`` fails the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLAGS_DOC = ROOT / "docs" / "flags.md"
# (script, its module), in the order a user meets them.
SCRIPTS = (("main_dino.py", "main_dino"), ("run_with_submitit.py", "run_with_submitit"),
           ("eval_knn.py", "eval_knn"), ("eval_linear.py", "eval_linear"), ("visualize_sparo.py", "visualize_sparo"))
TRAINING_SCRIPT = "main_dino.py"
LAUNCHER_SCRIPT = "run_with_submitit.py"
# main_dino.py's flags that facebookresearch/dino's main_dino.py has, with the same name and meaning.
DINO_FLAGS = frozenset((
    "arch", "patch_size", "out_dim", "norm_last_layer", "momentum_teacher", "use_bn_in_head", "warmup_teacher_temp",
    "teacher_temp", "warmup_teacher_temp_epochs", "use_fp16", "weight_decay", "weight_decay_end", "clip_grad",
    "batch_size_per_gpu", "epochs", "freeze_last_layer", "lr", "warmup_epochs", "min_lr", "optimizer",
    "drop_path_rate", "global_crops_scale", "local_crops_number", "local_crops_scale", "data_path", "output_dir",
    "saveckp_freq", "seed", "num_workers", "dist_url", "local_rank"))
# Why each of main_dino.py's other flags stays: what a user needs it for, or the paper or study that uses it.
WHY = {
    "config_file": "recipes as files (configs/)",
    "depth": "DINOv2's ViT-L and ViT-g depths; small models for tests and studies",
    "readout": "the read-out is what this project studies (SPARO against DINO's CLS and others)",
    "readout_replace_blocks": "SPARO replaces the last block (the paper); 0 puts a read-out on top",
    "num_registers": "DINOv2's register models (Darcet et al., ICLR 2024)",
    "readout_sees_registers": "whether the read-out reads the registers (read-out comparison)",
    "pos_embed_interpolation": "timm's resampling as an option; official weights were trained with DINO's",
    "sparo_slots": "the paper's L", "sparo_slot_dim": "the paper's V", "sparo_attn_dim": "the paper's H",
    "sparo_share_kv": "the paper's keys-as-values choice", "sparo_slot_norm": "the official code's slot normalisation",
    "sparo_query_init_std": "sets the initial attention temperature (slot-specialisation study)",
    "sparo_key_init_gain": "sets the initial attention temperature (slot-specialisation and retrofit studies)",
    "sparo_lr_mult": "the read-out's own learning rate (slot-specialisation study: x10 raises peakedness)",
    "map_heads": "the MAP read-out's heads (SigLIP)", "map_mlp_ratio": "the MAP read-out's MLP (SigLIP)",
    "simpool_heads": "SimPool's heads (the paper: 1)", "simpool_gamma": "SimPool's pooling exponent (the paper: 1.25)",
    "head_hidden_dim": "the DINO head's width (small heads for small data and tests)",
    "head_bottleneck_dim": "the DINO head's bottleneck (small heads for small data and tests)",
    "precision": "bf16 where the hardware computes it natively; the reference knows only fp16 and fp32",
    "accum_steps": "large effective batches on few GPUs (the one-GPU and continued-training recipes)",
    "compile": "GPU speed: torch.compile of each block",
    "global_crop_size": "small images trained at their own scale", "local_crop_size": "DINOv2's 98 px for patch 14",
    "augment_device": "colour, blur and solarisation batched on the GPU; pil: the reference's chain",
    "init_from": "start from trained weights (DINO, DINOv2, DINOv3, timm, exports)",
    "init_from_key": "which weights of --init_from (official files hold teacher and student)",
    "freeze_blocks": "the retrofit: a new read-out on frozen trained blocks",
    "unfreeze_at": "continued training's second stage (FINO)", "backbone_lr": "continued training's second stage",
    "unfreeze_warmup": "continued training's second stage", "layerwise_decay": "DINOv2's layer-wise decay, stage 2",
    "log_freq": "how often progress is printed (the reference: every 10 iterations)",
    "viz_freq": "the slot monitor's attention maps in TensorBoard",
    "device": "CPU runs, and a GPU other than the local rank's",
    "dist_timeout": "a hung process ends the job with a named cause instead of waiting 30 min",
    "knn_data_path": "a k-NN score after training that shows learning",
    "demo": "the built-in demo", "demo_data_dir": "the built-in demo", "demo_num_images": "the built-in demo",
}
# Environment variables that parsers read for a default: unset while generating, so the reference is the same on
# every machine.
ENVIRONMENT_DEFAULTS = ("DINO_SPARO_SHARED",)

HEADER = """\
# Flags

Every flag of the five scripts, with its default and help, grouped as `--help` groups them. Generated from the
parsers by `python scripts/flag_reference.py --write`; `tests/test_docs.py` fails when this file is stale, so do not
edit it by hand. A default of — is decided when the run starts, from other flags, the checkpoint or the machine (the
help says how).

- Boolean flags (`BOOL`) take `--flag true` or `--flag false` (also on/off, yes/no, 1/0), as DINO's `--use_fp16
  true`; those shown `[BOOL]` also take a bare `--flag`, meaning true.
- `main_dino.py --config FILE` reads a recipe (a YAML file of these flags, or the name of one in `configs/`); flags
  given on the command line override it. `--demo` reads `configs/demo.yaml`.
- Flags removed from earlier versions, and why: [removed.md](removed.md). main_dino.py's tables say why each flag
  is here: DINO's own (facebookresearch/dino's main_dino.py, same name and meaning), or what a user or a study
  needs it for.
"""


@contextlib.contextmanager
def _stable_environment() -> Iterator[None]:
    """Builds the parsers from the repository root without the environment variables that move their defaults."""
    saved = {name: os.environ.pop(name) for name in ENVIRONMENT_DEFAULTS if name in os.environ}
    cwd = os.getcwd()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path.remove(str(ROOT))
        os.environ.update(saved)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each script's parser, by script name."""
    with _stable_environment():
        return {script: importlib.import_module(module).get_args_parser() for script, module in SCRIPTS}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _metavar(action: argparse.Action) -> str:
    boolean = getattr(action.type, "__name__", "") == "bool_flag"
    if action.nargs == 0 or (action.nargs is None and action.metavar is None and action.choices is None
                             and not boolean):
        return ""  # a switch, or one value whose name the flag already says
    if action.metavar is not None:
        name = action.metavar
    elif boolean:
        name = "BOOL"
    elif action.choices is not None:
        name = "{" + ",".join(str(choice) for choice in action.choices) + "}"
    else:
        name = action.dest.upper()
    if action.nargs == "?":
        return f" [{name}]"
    if action.nargs == "+":
        return f" {name} [{name} ...]"
    if action.nargs == "*":
        return f" [{name} ...]"
    if isinstance(action.nargs, int):
        return " " + " ".join([name] * action.nargs)
    return f" {name}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(_value(item) for item in value)
    if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(ROOT):
        return "./" + Path(value).relative_to(ROOT).as_posix()  # a default under the working directory
    return str(value)


def _default(action: argparse.Action) -> str:
    if action.default is None or action.required:
        return "—"
    text = _value(action.default)
    return f"`{text}`" if text else '`""`'


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    if not action.help:
        return ""
    params = {**vars(action), "prog": parser.prog}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(choice) for choice in params["choices"])
    text = action.help % params if "%" in action.help else action.help
    return _cell(text) + (" (required)" if action.required else "")


def _table(actions: Sequence[argparse.Action], parser: argparse.ArgumentParser, why: bool = False) -> list[str]:
    """The rows of ``actions``; with ``why``, a column that says where each flag comes from."""
    lines = ["| flag | default | help |" + (" why it is here |" if why else ""),
             "|---|---|---|" + ("---|" if why else "")]
    for action in actions:
        flag = ", ".join(action.option_strings) + _metavar(action)
        row = f"| `{_cell(flag)}` | {_default(action)} | {_help(action, parser)} |"
        if why:
            row += " DINO's |" if action.dest in DINO_FLAGS else f" {WHY[action.dest]} |"
        lines.append(row)
    return lines


def _flags(group: argparse._ArgumentGroup) -> list[argparse.Action]:
    return [action for action in group._group_actions
            if action.option_strings and action.help is not argparse.SUPPRESS
            and not isinstance(action, argparse._HelpAction)]


def _groups(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    groups = []
    for group in parser._action_groups:
        actions = _flags(group)
        if actions:
            title = "general" if group.title in ("options", "optional arguments") else group.title
            groups.append((title, actions))
    return groups


def _anchor(script: str) -> str:
    return script.replace(".", "")


def render() -> str:
    """The whole reference, as docs/flags.md holds it."""
    by_script = parsers()
    training_groups = {title for title, _ in _groups(by_script[TRAINING_SCRIPT])}
    training_defaults = {action.dest: action.default for action in by_script[TRAINING_SCRIPT]._actions}
    first_seen: dict[tuple[str, str], str] = {}
    lines = [HEADER, " | ".join(f"[{script}](#{_anchor(script)})" for script in by_script), ""]
    for script, parser in by_script.items():
        lines += [f"## {script}", ""]
        if parser.description:
            lines += [_cell(parser.description).rstrip(".") + ".", ""]
        groups = _groups(parser)
        if script == LAUNCHER_SCRIPT:
            lines += [f"Every flag of [{TRAINING_SCRIPT}](#{_anchor(TRAINING_SCRIPT)}), and the launcher's own.", ""]
            changed = [action for action in parser._actions if action.dest in training_defaults
                       and action.option_strings and action.default != training_defaults[action.dest]]
            if changed:
                lines += [f"### defaults that differ from {TRAINING_SCRIPT}'s", "", *_table(changed, parser), ""]
            groups = [(title, actions) for title, actions in groups if title not in training_groups]
        for title, actions in groups:
            table = "\n".join(_table(actions, parser, why=script == TRAINING_SCRIPT))
            if (title, table) in first_seen:  # e.g. the evaluations' architecture flags, the same in each
                earlier = first_seen[title, table]
                lines += [f"### {title}", "", f"As in [{earlier}](#{_anchor(earlier)}).", ""]
            else:
                first_seen[title, table] = script
                lines += [f"### {title}", "", table, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {FLAGS_DOC.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true",
                        help=f"exit 1 when {FLAGS_DOC.relative_to(ROOT)} differs from the generated reference")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        FLAGS_DOC.write_text(text)
        print(f"wrote {FLAGS_DOC.relative_to(ROOT)}")
    elif args.check:
        current = FLAGS_DOC.read_text() if FLAGS_DOC.is_file() else None
        if current != text:
            print(f"{FLAGS_DOC.relative_to(ROOT)} is stale: run python scripts/flag_reference.py --write",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
