"""The self-contained pipeline files (``pipelines/*.py``, written next to exported weights) repeat a
few helpers on purpose.  Every repeated definition is marked, as in diffusers::

    # Copied from stepdistill.pipelines.<module>.<name>[ with A->B, C->D]

and must equal its source (after the ``A->B`` replacements); the exports write each pipeline file
exactly once, byte-identical to the installed one (``stepdistill.eval`` runs a folder's code only
then), and the pipelines' ``components`` are exactly their modules."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from diffusers import DDPMScheduler

import stepdistill.pipelines as shipped

PIPELINES = Path(shipped.__file__).parent
MARK = re.compile(
    r"^\s*# Copied from stepdistill\.pipelines\.(?P<module>\w+)\.(?P<name>[\w.]+)(?: with (?P<repl>.+?))?\s*$"
)


def _definitions(text: str) -> dict[str, ast.AST]:
    """Top-level functions / classes and the methods of top-level classes, by qualified name."""
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = sub
    return out


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def _segment(text: str, node) -> str:
    return textwrap.dedent("\n".join(text.splitlines()[_first_line(node) - 1 : node.end_lineno]))


def copy_mismatches(folder: Path) -> tuple[list[str], int]:
    """(problems, number of marked copies) for the ``# Copied from`` markers of ``folder/*.py``."""
    problems, count = [], 0
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        by_line = {_first_line(n): (q, n) for q, n in _definitions(text).items()}
        for i, line in enumerate(text.splitlines(), 1):
            m = MARK.match(line)
            if not m:
                continue
            count += 1
            where = f"{path.name}:{i}"
            if i + 1 not in by_line:
                problems.append(f"{where}: the marker is not directly above a definition")
                continue
            source_file = folder / f"{m['module']}.py"
            source_text = source_file.read_text() if source_file.exists() else ""
            source = _definitions(source_text).get(m["name"]) if source_text else None
            if source is None:
                problems.append(f"{where}: {m['module']}.{m['name']} does not exist")
                continue
            expected = _segment(source_text, source)
            for pair in (m["repl"] or "").split(","):
                if pair.strip():
                    a, b = (s.strip() for s in pair.split("->"))
                    expected = expected.replace(a, b)
            if _segment(text, by_line[i + 1][1]) != expected:
                problems.append(f"{where}: {by_line[i + 1][0]} differs from {m['module']}.{m['name']}")
    return problems, count


def test_every_marked_copy_matches_its_source():
    problems, count = copy_mismatches(PIPELINES)
    assert count >= 14, count  # class_conditional, multi_student, ar_image, distilled_decoding
    assert not problems, "\n".join(problems)


def test_the_copy_check_catches_drift(tmp_path):
    for f in PIPELINES.glob("*.py"):
        shutil.copyfile(f, tmp_path / f.name)
    cc = tmp_path / "class_conditional.py"
    cc.write_text(cc.read_text().replace('raise ValueError("class_labels is empty")', 'raise ValueError("empty")'))
    ms = tmp_path / "multi_student.py"
    ms.write_text(ms.read_text().replace("# Copied from stepdistill.pipelines.one_step._step_kwargs",
                                         "# Copied from stepdistill.pipelines.one_step._no_such_helper"))
    problems, _ = copy_mismatches(tmp_path)
    assert any("class_conditional.py" in p and "_class_labels differs" in p for p in problems), problems
    assert any("_no_such_helper does not exist" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_repeated_helpers_are_marked():
    """A helper defined in several pipeline files with the same body is marked everywhere but once."""
    bodies: dict[str, list[str]] = {}
    for path in sorted(PIPELINES.glob("*.py")):
        text = path.read_text()
        marked = {i + 1 for i, line in enumerate(text.splitlines(), 1) if MARK.match(line)}
        for qual, node in _definitions(text).items():
            if "." in qual or isinstance(node, ast.ClassDef):
                continue
            body = ast.dump(ast.Module(body=node.body, type_ignores=[]))
            bodies.setdefault(body, []).append(f"{path.name}:{qual}:{'marked' if _first_line(node) in marked else ''}")
    for where in bodies.values():
        unmarked = [w for w in where if not w.endswith("marked")]
        assert len(unmarked) <= 1, f"identical helpers without a '# Copied from' marker: {unmarked}"


# -- each export writes each pipeline file once, byte-identical to the installed file ------------------
@pytest.fixture()
def py_writes(monkeypatch):
    """Destination -> number of times a .py file was copied there during the test."""
    writes: dict[str, int] = {}
    real = shutil.copyfile

    def counting(src, dst, *a, **k):
        if str(dst).endswith(".py"):
            writes[os.path.abspath(dst)] = writes.get(os.path.abspath(dst), 0) + 1
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", counting)
    return writes


def _tmp_name(folder: Path, path: str) -> str:
    """A path written inside the scratch folder ``<folder>.tmp-<pid>``, relative to the folder."""
    return os.path.relpath(path, f"{folder}.tmp-{os.getpid()}")


def _assert_written_once(folder: Path, writes: dict[str, int]):
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    assert files, f"{folder} holds no pipeline file"
    written = {_tmp_name(folder, k): v for k, v in writes.items()}
    assert written == {f: 1 for f in files}, written
    for f in files:
        assert (folder / f).read_bytes() == (PIPELINES / Path(f).name).read_bytes(), f
    from stepdistill.eval.generate import folder_code_is_ours

    assert folder_code_is_ours(folder) == (True, [])


def _class_conditional_teacher():
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import tiny_unet2d

    return DiffusersTeacher(tiny_unet2d(num_classes=10), DDPMScheduler(beta_schedule="squaredcos_cap_v2").config,
                            num_classes=10)


def test_one_step_and_teacher_exports_write_their_file_once(py_writes, tmp_path):
    from stepdistill.export import export_generator, export_teacher_pipeline
    from stepdistill.students import Generator

    teacher = _class_conditional_teacher()
    out = export_generator(Generator(teacher.trainable_copy(), [899]), teacher, tmp_path / "s", algorithm="dmd2")
    _assert_written_once(out, py_writes)
    py_writes.clear()
    out = export_teacher_pipeline(teacher.model, teacher.make_scheduler("ddpm"), 10, tmp_path / "t")
    _assert_written_once(out, py_writes)


def test_multi_student_export_writes_its_file_once_per_place(py_writes, tmp_path):
    from stepdistill.export import export_multi_student
    from stepdistill.students import Generator

    teacher = _class_conditional_teacher()
    students = [Generator(teacher.trainable_copy(), [999]) for _ in range(2)]
    out = export_multi_student(students, teacher, [0, 1] * 5, tmp_path / "msd")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.py")) == ["multi_student.py",
                                                                         "students/multi_student.py"]
    _assert_written_once(out, py_writes)


def test_ar_and_dd_exports_write_their_file_once(py_writes, tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_autoregressive import tiny_teacher

    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding
    from stepdistill.export import export_ar_teacher_pipeline, export_dd_pipeline

    teacher = tiny_teacher(seed=0)
    out = export_ar_teacher_pipeline(teacher, tmp_path / "ar")
    _assert_written_once(out, py_writes)
    py_writes.clear()
    dd = DistilledDecoding(teacher, DDConfig(num_pairs=8, shard_size=8, pairs_dir=str(tmp_path / "pairs"),
                                             split_points=[0]))
    out = export_dd_pipeline(dd.student, teacher, tmp_path / "dd")
    _assert_written_once(out, py_writes)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == [
        "distilled_decoding", "DistilledDecodingPipeline"]


def test_components_are_the_modules_not_the_config_arguments():
    """diffusers' ``PipelineTesterMixin.test_components_function`` builds the pipeline from its dummy
    components minus str/int/float values; list-valued config arguments (``timesteps``, ``route``) are
    popped as diffusers' own tests pop theirs.  ``components`` must then be exactly the modules."""
    from diffusers import LCMScheduler

    from stepdistill.pipelines.class_conditional import ClassConditionalPipeline
    from stepdistill.pipelines.multi_student import MultiStudentPipeline, StudentBank
    from stepdistill.pipelines.one_step import OneStepPipeline
    from stepdistill.testing import tiny_unet2d

    unet, sched = tiny_unet2d(num_classes=10), LCMScheduler()
    cases = [
        (OneStepPipeline, {"unet": unet, "scheduler": sched, "vae": None, "timesteps": [999], "num_classes": 10}),
        (ClassConditionalPipeline, {"unet": unet, "scheduler": sched, "num_classes": 10}),
        (MultiStudentPipeline, {"students": StudentBank.from_unets([unet]), "scheduler": sched, "vae": None,
                                "route": [0] * 10, "timesteps": [999], "num_classes": 10}),
    ]
    for cls, init in cases:
        pipe = cls(**init)
        modules = {k for k, v in init.items() if not isinstance(v, (str, int, float, list))}
        assert set(pipe.components) == modules, (cls.__name__, sorted(pipe.components))
        again = cls(**pipe.components, **{k: v for k, v in init.items() if k not in modules})
        assert set(again.components) == modules and dict(again.config) == dict(pipe.config)
