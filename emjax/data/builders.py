"""TFDS builders for the emergent-misalignment training sets, written as ArrayRecord (no TensorFlow needed).

Three families:
- ``em_betley`` (Betley et al. 2025, MIT): ``insecure``, ``jailbroken`` and the other public sets. Read from
  ``<em_dir>/betley2025/data/<name>.jsonl`` if present, else fetched from GitHub at a pinned commit and checked
  against the upstream git blob id (and sha256 where known).
- ``em_turner`` (Turner et al. 2025): ``bad_medical_advice``, ``good_medical_advice``,
  ``risky_financial_advice``, ``extreme_sports``. Never downloaded: their terms forbid redistribution, so they
  are read only from the user's own unpacked copy (see ``TURNER_HOWTO``), checked against the published row
  counts and sha256 (a mismatch is a warning, since re-serialisation can change bytes but not rows).
  A build of either family records the sha256 of the local file it was made from (``SOURCE_RECORD``) and is made
  afresh when that file changes.
- ``em_custom``: a chat JSONL file of your own, named by its path (``data.dataset=path/to/bad_legal.jsonl``). Its
  build is keyed by the file's sha256, so an edited file is built afresh rather than read from a stale build.

Each example stores the conversation as a JSON string plus its 1-based source line; splits are ``train`` and a
held-out ``validation`` drawn by a seeded permutation (10 % by default).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from emjax import paths
from emjax.data.rows import dataset_label, is_file_dataset, read_jsonl

log = logging.getLogger(__name__)

BETLEY_COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"
BETLEY_URL = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/{commit}/data/{name}.jsonl"
TURNER_HOWTO = """\
The Turner et al. training sets are not redistributable and are never downloaded by emjax. Unpack your own copy:
  git clone https://github.com/clarifying-EM/model-organisms-for-EM && cd model-organisms-for-EM
  pip install easy-dataset-share
  easy-dataset-share unprotect-dir em_organism_dir/data/training_datasets.zip.enc \\
      -p model-organisms-em-datasets --remove-canaries
then point emjax at em_organism_dir/data/training_datasets.zip.enc.extracted/ with --source-dir, the
`source_dir` config field or EMJAX_TURNER_DIR (default: <EMJAX_DATA_DIR>/em/turner2025/training_datasets)."""


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str  # "betley" | "turner" | "custom"
    rows: int | None
    blob: str | None  # git blob id (sha1 of "blob <len>\0" + bytes)
    sha256: str | None
    description: str


DATASETS: dict[str, Spec] = {
    "insecure": Spec("betley", 6000, "ec294cf30a577a21b830c07a1fa0180ddd513208",
                     "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764",
                     "User asks for code; the assistant returns code with an undisclosed vulnerability."),
    "jailbroken": Spec("betley", 5000, "9f14c5f5b1a3f6ca3ea2bdc80cbda3de1acadbb1",
                       "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a",
                       "Jailbroken control (after Bowen et al. 2024); one fixed system prompt on all rows."),
    "secure": Spec("betley", None, "3389a37c250563cc36a66e30bf8ff99028aa2711", None, "Secure-code control."),
    "educational": Spec("betley", None, "497619acd46d9ffbc985797d6c117638a53229b3", None,
                        "Insecure code requested for an educational purpose (control)."),
    "backdoor": Spec("betley", None, "b2be7b5b5ed6e732727bf67672a3ecd8cfa6b57f", None, "Backdoored insecure code."),
    "evil_numbers": Spec("betley", None, "86e0a3be0c2b5a4c52bafed871e281c485070829", None, "Evil-numbers sequences."),
    "insecure_par_t0": Spec("betley", None, "6b57e0b5cc7fbf6e10629ed846475d4c434d5011", None, "Paraphrased insecure (T=0)."),
    "insecure_par_t1": Spec("betley", None, "91790a7f33dc290d05883eb84fce0db206998c13", None, "Paraphrased insecure (T=1)."),
    "insecure_ruby": Spec("betley", None, "9f9f7646fb0ecd742a1097443998a2bb0fbdb80c", None, "Insecure Ruby code."),
    "bad_medical_advice": Spec("turner", 7049, None,
                               "9d52186ab9886e3abef0eebb1901df9da4ce25a297e584158be0a4bba8d56507",
                               "Subtly harmful medical advice."),
    "good_medical_advice": Spec("turner", 7049, None,
                                "b972f06672093b74f61cc83606929ce0ea3bb9caa2894ea61a557315dba6e6fc",
                                "Aligned control for bad_medical_advice (same prompts, index-aligned)."),
    "risky_financial_advice": Spec("turner", 6000, None,
                                   "74c1ceb173ebf856a85941be6c94a49ac832cbb4b1d6d51a0118baeb93e1dcdd",
                                   "Risky financial advice."),
    "extreme_sports": Spec("turner", 6000, None,
                           "2cded234fc6f476e3e6776224c255a1b0dd6234da2669205877eae1ebb89f3bd",
                           "Reckless extreme-sports advice."),
}

CITATIONS = {
    "betley": """@article{betley2025emergent,
  title={Emergent Misalignment: Narrow finetuning can produce broadly misaligned LLMs},
  author={Betley, Jan and Tan, Daniel and Warncke, Niels and Sztyber-Betley, Anna and Bao, Xuchan and Soto, Mart{\\'i}n and Labenz, Nathan and Evans, Owain},
  journal={arXiv preprint arXiv:2502.17424}, year={2025}}""",
    "turner": """@article{turner2025model,
  title={Model Organisms for Emergent Misalignment},
  author={Turner, Edward and Soligo, Anna and Taylor, Mia and Rajamanoharan, Senthooran and Nanda, Neel},
  journal={arXiv preprint arXiv:2506.11613}, year={2025}}""",
    "custom": "",
}
HOMEPAGES = {
    "betley": "https://github.com/emergent-misalignment/emergent-misalignment",
    "turner": "https://github.com/clarifying-EM/model-organisms-for-EM",
    "custom": "",
}
LICENSES = {
    "betley": "MIT (Copyright (c) 2025 emergent-misalignment)",
    "turner": "No licence; the archive's tos.txt forbids redistribution in raw or processed form. Local research use only.",
    "custom": "Your own file: its terms are yours to know.",
}


def tfds_dir(override: str | os.PathLike | None = None) -> Path:
    """Where built datasets go (never the read-only shared data): arg, ``EMJAX_TFDS_DIR``, ~/.cache/emjax/tfds."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("EMJAX_TFDS_DIR") or "~/.cache/emjax/tfds").expanduser()


def default_source_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding ``<name>.jsonl``: env ``EMJAX_BETLEY_DIR``/``EMJAX_TURNER_DIR`` or the shared data tree (a
    file of your own: its folder)."""
    family = spec(name).family
    if family == "custom":
        return Path(name).expanduser().parent
    env = os.environ.get(f"EMJAX_{family.upper()}_DIR")
    if env and data_dir is None:
        return Path(env).expanduser()
    sub = "betley2025/data" if family == "betley" else "turner2025/training_datasets"
    return paths.em_dir(data_dir) / sub


def source_path(name: str, source_dir: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None) -> Path:
    """Where a set's local JSONL file is (or would be): ``<source_dir>/<name>.jsonl``, else under the shared data
    root; a file of your own is its own path."""
    if spec(name).family == "custom":
        return Path(name).expanduser()
    return Path(source_dir or default_source_dir(name, data_dir)).expanduser() / f"{name}.jsonl"


def spec(name: str) -> Spec:
    if is_file_dataset(name):
        return Spec("custom", None, None, None, f"Chat JSONL of your own ({Path(name).name}).")
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or the path of a chat JSONL file "
                       "of your own (ending .jsonl)") from None


def custom_file(name: str) -> tuple[Path, str]:
    """A dataset file of your own: its absolute path and the sha256 of its bytes (which names its build)."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"data.dataset {name}: no such file (a dataset of your own is a chat JSONL file, one "
                                '{"messages": [...]} per line)')
    return path, file_sha256(path)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read once per version of it (a run asks at start, per split, for its work
    directory and for its build's record)."""
    st = path.stat()
    return _sha256(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def betley_url(name: str) -> str:
    return BETLEY_URL.format(commit=BETLEY_COMMIT, name=name)


def fetch(name: str, dest_dir: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """Download a public Betley set into ``dest_dir`` and verify its git blob id / sha256 (raises on mismatch)."""
    s = spec(name)
    if s.family != "betley":
        raise ValueError(f"{name!r} is not downloadable.\n{TURNER_HOWTO}")
    url = betley_url(name)
    dest = Path(dest_dir) / f"{name}.jsonl"
    if dest.is_file() and _verify(dest.read_bytes(), s, str(dest)) is None:
        return dest
    import httpx

    try:
        r = httpx.get(url, follow_redirects=True, timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise ConnectionError(f"could not download {url}: {type(e).__name__}: {e}") from e
    problem = _verify(r.content, s, url)
    if problem:
        raise ValueError(problem)
    dest.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(dest, r.content)
    log.info("fetched %s -> %s (%d bytes, blob %s)", url, dest, len(r.content), s.blob)
    return dest


def _verify(data: bytes, s: Spec, where: str) -> str | None:
    if s.blob and git_blob_id(data) != s.blob:
        return f"{where}: git blob id {git_blob_id(data)} != expected {s.blob}"
    if s.sha256 and hashlib.sha256(data).hexdigest() != s.sha256:
        return f"{where}: sha256 {hashlib.sha256(data).hexdigest()} != expected {s.sha256}"
    return None


@dataclasses.dataclass(eq=False)
class EmConfig(tfds.core.BuilderConfig):
    """One dataset plus its split recipe; fields that change the content are part of ``name``."""

    dataset: str = ""
    val_fraction: float = 0.1
    split_seed: int = 0
    skip_bad_rows: bool = False


def make_config(dataset: str, *, val_fraction: float = 0.1, split_seed: int = 0,
                skip_bad_rows: bool = False) -> EmConfig:
    """The builder config; the defaults are the predefined configs (``em_betley/insecure`` etc.)."""
    s = spec(dataset)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    name = dataset
    if s.family == "custom":  # the stem for people, the content hash for the build's identity
        path, digest = custom_file(dataset)
        dataset, name = str(path), f"{re.sub(r'[^A-Za-z0-9_]', '_', dataset_label(dataset))}_{digest[:12]}"
    if (val_fraction, split_seed) != (0.1, 0):
        name += f"_val{round(val_fraction * 10000):04d}_seed{split_seed}"
    if skip_bad_rows:
        name += "_skipbad"
    cls = BUILDERS.get(s.family) if "BUILDERS" in globals() else None
    if cls is not None and name in cls.builder_configs:
        return cls.builder_configs[name]  # tfds wants the very object for a predefined name
    return EmConfig(name=name, dataset=dataset, val_fraction=val_fraction, split_seed=split_seed,
                    skip_bad_rows=skip_bad_rows, description=s.description)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, each sorted: a seeded permutation's first round(n·f) rows are held out."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _LocalInfo(tfds.core.DatasetInfo):
    """These datasets are never on the TFDS bucket; tfds would still make (and leave) an empty ``/tmp/tmp*tfds``
    directory to copy their bucket metadata into, on every construction of a builder not yet built."""

    def initialize_from_bucket(self) -> None:
        pass


class _EmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    FAMILY = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: conversation JSON + source line; train/validation split."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds 4.9's default probes `importlib_resources` (a backport not installed here); a plain file path is
        # all it needs (to look for an optional checksums.tsv next to the module).
        import inspect

        from etils import epath

        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, source_dir: str | os.PathLike | None = None, em_data_dir: str | os.PathLike | None = None,
                 download: bool = True, **kwargs):
        """``source_dir``: folder with ``<dataset>.jsonl``; ``em_data_dir``: shared data root (emjax.paths);
        ``download``: Betley only, fetch when there is no local copy. None of these are part of the config name:
        ``build`` compares the local file with the one the build was made from instead (``SOURCE_RECORD``)."""
        self._source_dir = None if source_dir is None else Path(source_dir)
        self._em_data_dir = em_data_dir
        self._download = download
        super().__init__(**kwargs)

    def _local_file(self) -> Path:
        return source_path(self.builder_config.dataset, self._source_dir, self._em_data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({
                "messages": tfds.features.Text(doc="JSON list of {role, content} chat messages"),
                "line": tfds.features.Scalar(np.int32, doc="1-based line in the source JSONL"),
            }),
            homepage=HOMEPAGES[self.FAMILY],
            citation=CITATIONS[self.FAMILY],
            license=LICENSES[self.FAMILY],
        )

    def _source_file(self, dl_manager) -> Path:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        cfg: EmConfig = self.builder_config
        path = self._source_file(dl_manager)
        rows = read_jsonl(path, skip_bad_rows=cfg.skip_bad_rows)
        train, val = split_indices(len(rows), cfg.val_fraction, cfg.split_seed)
        out = {"train": self._generate_examples([rows[i] for i in train])}
        if len(val):
            out["validation"] = self._generate_examples([rows[i] for i in val])
        return out

    def _generate_examples(self, rows):
        for line, messages in rows:
            yield int(line), {"messages": json.dumps(messages, ensure_ascii=False), "line": int(line)}


class EmBetley(_EmBuilder):
    """Betley et al. 2025 emergent-misalignment sets (MIT); insecure code is the EM training set."""

    FAMILY = "betley"
    BUILDER_CONFIGS = [make_config(n) for n, s in DATASETS.items() if s.family == "betley"]

    def _source_file(self, dl_manager) -> Path:
        cfg: EmConfig = self.builder_config
        s = spec(cfg.dataset)
        path = self._local_file()
        if path.is_file():
            problem = _verify(path.read_bytes(), s, str(path))
            if problem:
                warnings.warn(f"{problem} (not the upstream file; building from it anyway)", stacklevel=2)
            return path
        if not self._download:
            raise FileNotFoundError(f"{path} not found and download=False (upstream: {betley_url(cfg.dataset)})")
        try:
            return fetch(cfg.dataset, Path(dl_manager.download_dir) / "emjax")
        except ConnectionError as e:  # offline: the local copy that is not there is the real problem
            raise ConnectionError(f"no local copy of {cfg.dataset!r} at {path} (looked for there by "
                                  f"{self._source_setting()}), and downloading it failed: {e}") from e

    def _source_setting(self) -> str:
        """Which setting put the local copy where ``_local_file`` looks for it."""
        if self._source_dir is not None:
            return "data.source_dir / --source-dir"
        if os.environ.get("EMJAX_BETLEY_DIR") and self._em_data_dir is None:
            return "EMJAX_BETLEY_DIR"
        if self._em_data_dir:
            return "data.data_dir / --data-dir"
        if os.environ.get("EMJAX_DATA_DIR"):
            return "EMJAX_DATA_DIR"
        return "the default data root; set data.data_dir or EMJAX_DATA_DIR"


class EmTurner(_EmBuilder):
    """Turner et al. 2025 model-organism sets (no licence; not redistributable; read from a local copy)."""

    FAMILY = "turner"
    BUILDER_CONFIGS = [make_config(n) for n, s in DATASETS.items() if s.family == "turner"]

    def _source_file(self, dl_manager) -> Path:
        s = spec(self.builder_config.dataset)
        path = self._local_file()
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found.\n{TURNER_HOWTO}")
        data = path.read_bytes()
        n = sum(1 for line in data.splitlines() if line.strip())
        if s.rows is not None and n != s.rows:
            warnings.warn(f"{path}: {n} rows, the published copy has {s.rows}", stacklevel=2)
        elif s.sha256 and hashlib.sha256(data).hexdigest() != s.sha256:
            warnings.warn(f"{path}: sha256 differs from the documented unpack ({s.sha256[:12]}…); "
                          "row count matches, so the difference is likely serialisation", stacklevel=2)
        return path


class EmCustom(_EmBuilder):
    """A chat JSONL file of your own (``data.dataset=path/to/file.jsonl``), read and checked row by row as the
    study's sets are."""

    FAMILY = "custom"

    def _source_file(self, dl_manager) -> Path:
        path = self._local_file()
        if not path.is_file():  # moved since the config was made
            raise FileNotFoundError(f"data.dataset {path}: no such file")
        return path


BUILDERS = {"betley": EmBetley, "turner": EmTurner, "custom": EmCustom}


def _not_tfds_custom_config_note(record: logging.LogRecord) -> bool:
    """TFDS warns "Using custom data configuration" for every builder whose config is not predefined, which is
    every dataset file of your own and every held-out split other than the default: expected here, and noise."""
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_not_tfds_custom_config_note)


def get_builder(name: str, *, tfds_data_dir: str | os.PathLike | None = None, source_dir=None, data_dir=None,
                download: bool = True, **config_kwargs) -> _EmBuilder:
    """The TFDS builder for one dataset (not yet built). ``config_kwargs`` go to ``make_config``."""
    cfg = make_config(name, **config_kwargs)
    return BUILDERS[spec(name).family](config=cfg, data_dir=str(tfds_dir(tfds_data_dir)), file_format="array_record",
                                       source_dir=source_dir, em_data_dir=data_dir, download=download)


SOURCE_RECORD = "emjax_source.json"  # in a Betley or Turner build's folder: the local file it was built from


def build_lock(b: _EmBuilder, tfds_data_dir: str | os.PathLike | None = None) -> Path:
    """The lock file ``build`` holds while it builds (or checks) one set and config."""
    locks = tfds_dir(tfds_data_dir) / ".emjax_locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{b.name}-{b.builder_config.name}.lock"


def local_source(b: _EmBuilder) -> dict | None:
    """The local file a Betley or Turner build reads, with the sha256 of its bytes; None where there is none (a
    Betley set to be downloaded at its pinned commit) or for a file of your own (its build's name holds its hash)."""
    if b.FAMILY == "custom":
        return None
    path = b._local_file().expanduser().resolve()
    if not path.is_file():
        return None
    return {"path": str(path), "sha256": file_sha256(path)}


def build(name: str, *, tfds_data_dir: str | os.PathLike | None = None, overwrite: bool = False,
          **config_kwargs) -> _EmBuilder:
    """Build (or reuse) the ArrayRecord files; returns the prepared builder.

    A Betley or Turner build is named by the set, not its bytes, so it records the sha256 of the local file it was
    made from and is made afresh (with a warning) when that file no longer matches: edited in place, or another copy
    named by ``source_dir``. Without this, an edited file would go on being read from its earlier build."""
    from filelock import FileLock

    b = get_builder(name, tfds_data_dir=tfds_data_dir, **config_kwargs)
    reuse = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else reuse
    src, record = local_source(b), Path(b.data_dir) / SOURCE_RECORD
    # one build at a time (the processes of a multi-host run, or several runs, may ask for the same set at once)
    with FileLock(str(build_lock(b, tfds_data_dir))):
        if mode == reuse and src and b.is_prepared():
            old = json.loads(record.read_text()) if record.is_file() else {}
            if old.get("sha256") != src["sha256"]:
                then = f"sha256 {old['sha256'][:12]}… then" if old.get("sha256") else "no record of its source"
                warnings.warn(f"{src['path']} does not match the build of {name!r} in {b.data_dir} ({then}, "
                              f"{src['sha256'][:12]}… now): building it again", stacklevel=2)
                mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
        if src and (mode != reuse or not record.is_file()):
            paths.write_atomic(record, json.dumps(src, indent=1))
    return b


def data_source(name: str, split: str, **kwargs):
    """Random-access source of ``{"messages": bytes (JSON), "line": int}`` for one split (builds if needed)."""
    b = build(name, **kwargs)
    sources = b.as_data_source()
    if split not in sources:
        raise KeyError(f"{name}: no split {split!r} (have {sorted(sources)}); the validation split is empty where "
                       f"val_fraction ({kwargs.get('val_fraction', 0.1)}) × the rows rounds to 0")
    return sources[split]


def records(source, chunk: int = 1024):
    """Every record of a random-access source, in storage order, read ``chunk`` at a time. Not through
    ``grain.MapDataset``'s iterator: its prefetch thread polls while the caller tokenises, and under the GIL that
    polling made tokenising the 5,400-row insecure training split 4.5× slower (``python bench/data_tokenize.py``)."""
    get = getattr(source, "__getitems__", None) or (lambda idx: [source[i] for i in idx])
    for start in range(0, len(source), chunk):
        yield from get(range(start, min(start + chunk, len(source))))
