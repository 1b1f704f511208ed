"""The VideoAlign prompt template, taken verbatim from the user's VideoAlign release (none is shipped here).

The reward model was trained with one text: VideoAlign's ``prompt_template.py`` builds it with
``build_prompt(prompt, dimension, template_type)``; the released VideoReward model uses ``template_type``
``detailed_special`` (``data_config.prompt_template_type`` in its ``model_config.json``, ``train.sh``), whose
template places ``<|VQ_reward|>`` and ``<|MQ_reward|>`` right after the visual- and motion-quality sections,
then the text prompt, then ``<|TA_reward|>``; the reward is read at those tokens (``trainer.py``,
``reward_token == "special"``). KwaiVGI/VideoAlign 219ab9d: ``prompt_template.py``, ``inference.py`` 140,
``trainer.py`` 157-165.

Sources, in order: ``params.prompt_template_file`` (config), else ``prompt_template.py`` or
``prompt_template.txt`` beside the checkpoint (the VideoReward folder, its chosen ``checkpoint-*`` folder, or
the two folders above it, e.g. a VideoAlign clone holding ``checkpoints/VideoReward``). A ``.py`` file is the
release's module: it is *parsed*, never run (``ast``), and the string constant that ``build_prompt`` formats
for the template type is used. Any other file is the template text itself, with ``{text_prompt}``.
"""
from __future__ import annotations

import ast
from pathlib import Path

from kvpo_megatron.conditioning.files import MissingFileError
from kvpo_megatron.errors import ConfigError

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
TEMPLATE_FILES = ("prompt_template.py", "prompt_template.txt")
DEFAULT_TYPE = "detailed_special"


def find_template(checkpoint: Path, chosen: Path | None = None) -> Path:
    """``prompt_template.py``/``.txt`` beside the checkpoint; one error listing every place tried."""
    folders = [f for f in (chosen, checkpoint, checkpoint.parent, checkpoint.parent.parent) if f is not None]
    tried = []
    for folder in dict.fromkeys(folders):
        for name in TEMPLATE_FILES:
            if (folder / name).is_file():
                return folder / name
            tried.append(str(folder / name))
    raise MissingFileError("VideoAlign prompt template not found: the reward must use the template it was trained "
                           "with, from your VideoAlign release (its prompt_template.py, or the template text in a "
                           "file). Set params.prompt_template_file, or put it beside the checkpoint; tried "
                           + ", ".join(tried))


def _branch_constant(fn: ast.FunctionDef, template_type: str) -> str | None:
    """The name ``X`` in ``if template_type == "<type>": return X.format(...)`` inside ``build_prompt``."""
    for node in ast.walk(fn):
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            continue
        values = [c.value for c in node.test.comparators if isinstance(c, ast.Constant)]
        if template_type not in values:
            continue
        for stmt in node.body:
            call = stmt.value if isinstance(stmt, ast.Return) else None
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "format"
                    and isinstance(call.func.value, ast.Name)):
                return call.func.value.id
    return None


def template_from_module(source: str, template_type: str, *, name: str) -> str:
    """The template string ``build_prompt`` uses for ``template_type`` in a ``prompt_template.py`` source."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as e:
        raise ConfigError(f"{name}: not a Python module ({e.msg}, line {e.lineno})") from None
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_prompt"), None)
    const = _branch_constant(fn, template_type) if fn is not None else None
    if const is None or const not in constants:
        raise ConfigError(f"{name}: no build_prompt branch formatting a module-level template string for "
                          f"template type {template_type!r} (model_config.json data_config.prompt_template_type)")
    return constants[const]


def read_template(path: str | Path, template_type: str = DEFAULT_TYPE) -> str:
    """The template text (verbatim) from a release ``prompt_template.py`` or a text file; checked to hold
    ``{text_prompt}`` and each reward token once."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"VideoAlign prompt template not found: {p} (config field 'params.prompt_template_file')")
    text = p.read_text(encoding="utf-8")
    template = template_from_module(text, template_type, name=str(p)) if p.suffix == ".py" else text
    counts = {t: template.count(t) for t in SPECIAL_TOKENS}
    if "{text_prompt}" not in template or any(c != 1 for c in counts.values()):
        raise ConfigError(f"{p}: a VideoAlign reward template needs '{{text_prompt}}' and each reward token once "
                          f"(found {counts}); the reward is read at those tokens")
    return template


def render(template: str, prompt: str) -> str:
    """The user text, as ``build_prompt`` makes it."""
    return template.format(text_prompt=prompt)
