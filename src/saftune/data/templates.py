"""Prompt templates per dataset, for zero-shot heads: `templates_for("oxford-pets")`.

"single" templates are the hand-written per-dataset prompts of CoOp, which the SAFT paper uses for its
few-shot, base-to-new and cross-dataset experiments (its Table 7). "openai" is the ensemble of 80
ImageNet templates from the CLIP paper's prompt-engineering notebook; "openai-7" is the 7-template
subset CoOp's zero-shot CLIP baseline averages on ImageNet. The ImageNet ensembles are generic object
prompts, so they are returned for any image dataset when asked for.

Dataset names are matched loosely: case, spaces, "-" and "_" are ignored, and the CoOp class names work
as well as saftune's registry names ("OxfordPets" == "oxford-pets" == "oxford_pets").

Example:
    >>> templates_for("oxford-pets")
    ['a photo of a {}, a type of pet.']
    >>> len(templates_for("imagenet", "openai"))
    80
    >>> expand(["a photo of a {}.", "art of the {}."], ["cat", "dog"])
    [['a photo of a cat.', 'art of the cat.'], ['a photo of a dog.', 'art of the dog.']]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# One template per dataset (CoOp's per-dataset prompts; SAFT paper Table 7). Keys: normalised names.
_SINGLE = {
    "imagenet": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenetsketch": "a photo of a {}.",
    "imageneta": "a photo of a {}.",
    "imagenetr": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxfordpets": "a photo of a {}, a type of pet.",
    "stanfordcars": "a photo of a {}.",
    "oxfordflowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvcaircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    # DomainNet: one prompt for every domain, as the papers' zero-shot heads (no domain word).
    "domainnet": "a photo of a {}.",
    # BOSS text suites (saftune's own choice; BOSS itself uses a verbalizer). The sentiment prompt
    # matches the embedded benchmark's ("a negative review."). NLI has no natural class prompt: "{}"
    # makes the class names themselves the label words.
    "bosssentiment": "a {} review.",
    "bosstoxicity": "a {} comment.",
    "bossnli": "{}",
}

# Other spellings of the same datasets (CoOp class names, torchvision names, folder names).
_ALIASES = {
    "imagenet1k": "imagenet",
    "ilsvrc2012": "imagenet",
    "imagenetadversarial": "imageneta",
    "imagenetrendition": "imagenetr",
    "caltech": "caltech101",
    "pets": "oxfordpets",
    "cars": "stanfordcars",
    "flowers": "oxfordflowers",
    "flowers102": "oxfordflowers",
    "oxfordflowers102": "oxfordflowers",
    "food": "food101",
    "aircraft": "fgvcaircraft",
    "fgvc": "fgvcaircraft",
    "sun": "sun397",
    "describabletextures": "dtd",
    "textures": "dtd",
    "ucf": "ucf101",
    "sentiment": "bosssentiment",
    "toxicity": "bosstoxicity",
    "nli": "bossnli",
}

_TEXT_DATASETS = {"bosssentiment", "bosstoxicity", "bossnli"}

# The 80 ImageNet prompt templates of the CLIP paper, in their published order.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 templates the CLIP authors found best as a small ensemble (CoOp's zero-shot ImageNet baseline).
OPENAI_IMAGENET_TEMPLATES_7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

KINDS = ("single", "openai", "openai-7")


def _key(name: str) -> str:
    key = re.sub(r"[^0-9a-z]", "", name.lower())
    return _ALIASES.get(key, key)


def known_datasets() -> list[str]:
    """Normalised dataset names that have templates."""
    return sorted(_SINGLE)


def imagenet_templates(kind: str = "openai") -> list[str]:
    """ImageNet prompt templates: "openai" (80), "openai-7" (the 7-template subset) or "single".

    Example:
        >>> imagenet_templates("openai-7")[0]
        'itap of a {}.'
    """
    if kind == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if kind == "openai-7":
        return list(OPENAI_IMAGENET_TEMPLATES_7)
    if kind == "single":
        return [_SINGLE["imagenet"]]
    raise ValueError(f"unknown template kind {kind!r}; choose one of {', '.join(KINDS)}")


def templates_for(dataset_name: str, kind: str = "single") -> list[str]:
    """Prompt templates for a dataset.

    Args:
        dataset_name: registry name ("oxford-pets"), CoOp name ("OxfordPets") or folder name.
        kind: "single" (the per-dataset template), "openai" (80 ImageNet templates) or "openai-7".
            The ImageNet ensembles are available for image datasets only.

    Raises:
        ValueError: unknown dataset or kind (the message lists the known ones).

    Example:
        >>> templates_for("DescribableTextures")
        ['{} texture.']
    """
    key = _key(dataset_name)
    if key not in _SINGLE:
        raise ValueError(f"no prompt templates for dataset {dataset_name!r}; known: {', '.join(known_datasets())}")
    if kind == "single":
        return [_SINGLE[key]]
    if kind not in KINDS:
        raise ValueError(f"unknown template kind {kind!r}; choose one of {', '.join(KINDS)}")
    if key in _TEXT_DATASETS:
        raise ValueError(f"template kind {kind!r} is for image datasets; {dataset_name!r} is a text dataset")
    return imagenet_templates(kind)


def check_template(template: str) -> str:
    """Return `template` if it has exactly one "{}" placeholder, else raise ValueError."""
    if template.count("{}") != 1 or re.search(r"\{[^}]", template):
        raise ValueError(f"a prompt template needs exactly one '{{}}' placeholder, got {template!r}")
    return template


def expand(templates: Sequence[str], classnames: Sequence[str]) -> list[list[str]]:
    """Prompt texts per class: `result[c][t] = templates[t].format(classnames[c])`.

    Example:
        >>> expand(["{} texture."], ["banded", "woven"])
        [['banded texture.'], ['woven texture.']]
    """
    templates = [check_template(t) for t in templates]
    return [[t.format(c) for t in templates] for c in classnames]
