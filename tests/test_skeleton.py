"""The three programs share one skeleton: a reader who has read one train.py can read the others.

The check is on the source (ast), so it runs without importing torch or the programs.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("housing", "cifar", "anomaly")


def signatures(path):
    """The top-level functions of one file, in order, as (name, parameters with their defaults)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        args = node.args
        positional = args.posonlyargs + args.args
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        params = [(a.arg, ast.unparse(d) if d is not None else None) for a, d in zip(positional, defaults)]
        params += [
            ("*" + a.arg, ast.unparse(d) if d is not None else None) for a, d in zip(args.kwonlyargs, args.kw_defaults)
        ]
        if args.vararg:
            params.append(("*" + args.vararg.arg, None))
        if args.kwarg:
            params.append(("**" + args.kwarg.arg, None))
        found.append((node.name, params))
    return found


def test_the_three_train_py_define_the_same_functions_in_the_same_order_with_the_same_signatures():
    skeletons = {name: signatures(ROOT / name / "train.py") for name in PROGRAMS}
    reference = skeletons["housing"]
    # The skeleton itself: what a reader looks for in every program.
    names = [name for name, _ in reference]
    for step in (
        "parse_args",
        "build_data",
        "build_model",
        "build_optimizer",
        "make_loss",
        "build_training",
        "train_one_epoch",
        "evaluate",
        "train",
        "main",
    ):
        assert step in names, f"housing/train.py has no {step}()"
    assert names[-1] == "main", "main() comes last, after everything it calls"
    for program in PROGRAMS[1:]:
        assert skeletons[program] == reference, (
            f"{program}/train.py differs from housing/train.py:\n"
            f"  housing: {reference}\n  {program}: {skeletons[program]}"
        )


def test_the_signature_check_sees_a_difference():
    """The check above must be able to fail: a reordered or renamed parameter is a difference."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp, "one.py"), Path(tmp, "two.py")
        one.write_text("def evaluate(cfg, model, data, dist, final=False):\n    pass\n")
        two.write_text("def evaluate(cfg, data, model, dist, final=False):\n    pass\n")
        assert signatures(one) != signatures(two)
        two.write_text("def evaluate(cfg, model, data, dist, final=True):\n    pass\n")
        assert signatures(one) != signatures(two)
        two.write_text("def evaluate(cfg, model, data, dist, final=False):\n    return 1\n")
        assert signatures(one) == signatures(two)


def test_config_defaults_come_from_the_command_line_alone():
    """One source of defaults: a program's Config declares none of its own fields' defaults (the
    CLI's DEFAULTS and presets give them), and the shared fields' defaults are the parser's."""
    import dataclasses
    import importlib

    from common.config import RunConfig

    shared = {f.name for f in dataclasses.fields(RunConfig)}
    for program in PROGRAMS:
        train = importlib.import_module(f"{program}.train")
        cfg = train.parse_args(["--data-dir", "data"])
        for f in dataclasses.fields(train.Config):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if f.name not in shared:
                assert not has_default, f"{program}.train.Config.{f.name} has a default of its own"
            elif f.default is not dataclasses.MISSING:
                assert getattr(cfg, f.name) == f.default, (
                    f"{program}: RunConfig.{f.name} defaults to {f.default!r}, the CLI to {getattr(cfg, f.name)!r}"
                )
