"""Quantum ESPRESSO pseudopotentials: read UPF headers and pick one PBE file per element from a folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from relaxtune.dft.settings import GenerateError, GenerateSettings

RY = 13.605693122994  # eV
DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"  # Debian/Ubuntu quantum-espresso-data


def upf_header(path: Path | str) -> dict:
    """Element, functional, pseudopotential type and suggested cutoffs (Ry) from a UPF v1 or v2 header."""
    path = Path(path)
    with open(path, errors="replace") as fh:
        text = fh.read(60000)
    out: dict = {"file": path.name}
    m = re.search(r"<PP_HEADER(.*?)(/>|>)", text, re.S)
    attrs = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(1))) if m else {}
    if attrs:  # UPF v2
        out["element"] = attrs.get("element", "").strip()
        out["functional"] = attrs.get("functional", "").strip()
        out["pseudo_type"] = attrs.get("pseudo_type", "").strip()
        for key in ("wfc_cutoff", "rho_cutoff"):
            try:
                out[key] = float(attrs[key])
            except (KeyError, ValueError):
                pass
        out["relativistic"] = attrs.get("relativistic", "").strip()
        out["has_so"] = attrs.get("has_so", "").strip().lower() in ("t", "true", ".true.")
    else:  # UPF v1: "value   label" lines
        block = text.split("<PP_HEADER>", 1)[1].split("</PP_HEADER>", 1)[0] if "<PP_HEADER>" in text else ""
        for line in block.splitlines():
            if "Element" in line:
                out["element"] = line.split()[0]
            elif "Exchange-Correlation" in line:
                out["functional"] = line.split("Exchange")[0].strip()
            elif re.search(r"\b(NC|US|PAW)\b", line) and "pseudo_type" not in out:
                out["pseudo_type"] = line.split()[0]
            elif "Suggested cutoff" in line:
                vals = line.split()
                try:
                    out["wfc_cutoff"], out["rho_cutoff"] = float(vals[0]), float(vals[1])
                except (ValueError, IndexError):
                    pass
    if not out.get("element"):
        out["element"] = re.split(r"[._\-]", path.name)[0]
    out["element"] = out["element"].strip().capitalize()
    return out


def is_pbe(functional: str) -> bool:
    """PBE in any of the UPF spellings: ``PBE``, ``SLA PW PBE PBE``, ``SLA PW PBX PBC``, ``SLA-PW-PBX-PBC``."""
    tokens = [t.upper() for t in re.split(r"[\s\-+]+", functional.strip()) if t]
    if tokens in (["PBE"], ["GGA-PBE"]):
        return True
    return len(tokens) >= 4 and tokens[:2] == ["SLA", "PW"] and tokens[2:4] in (["PBE", "PBE"], ["PBX", "PBC"])


def pseudo_dir_of(settings: GenerateSettings) -> Path:
    """The UPF folder: ``settings.pseudo_dir``, else ``$ESPRESSO_PSEUDO``, else :data:`DEFAULT_PSEUDO_DIR`."""
    return Path(settings.pseudo_dir or os.environ.get("ESPRESSO_PSEUDO") or DEFAULT_PSEUDO_DIR)


def choose_pseudopotentials(symbols: list[str], settings: GenerateSettings) -> dict[str, str]:
    """A PBE pseudopotential file per element, from ``settings.pseudopotentials`` or the pseudo folder.

    Files are matched by the element and functional in their header (not their name: a folder such as
    Debian's holds LDA, PBEsol and fully relativistic files too). Preferred: scalar-relativistic, a
    suggested cutoff within ``settings.ecut``, then norm-conserving (cheapest), then name order.
    """
    folder = pseudo_dir_of(settings)
    chosen: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in settings.pseudopotentials.split(","))):
        el, _, fname = item.partition("=")
        if not fname or not (folder / fname).exists():
            raise GenerateError(f"pseudopotentials: {item!r}: expected ELEMENT=FILE with FILE in {folder}")
        chosen[el.strip()] = fname.strip()
    missing = sorted(set(symbols) - set(chosen))
    if not missing:
        return {s: chosen[s] for s in sorted(set(symbols))}
    if not folder.is_dir():
        raise GenerateError(f"pseudo_dir: {folder} does not exist (install quantum-espresso-data, or set "
                            "--pseudo-dir / $ESPRESSO_PSEUDO to a folder of UPF files)")
    candidates: dict[str, list[tuple]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".upf":
            continue
        try:
            head = upf_header(path)
        except OSError:
            continue
        if head["element"] not in missing or not is_pbe(head.get("functional", "")):
            continue
        full_rel = head.get("has_so") or head.get("relativistic") == "full" or ".rel-" in path.name
        too_hard = head.get("wfc_cutoff", 0.0) * RY > settings.ecut + 1e-6
        not_nc = head.get("pseudo_type", "").upper() not in ("NC", "SL")
        candidates.setdefault(head["element"], []).append((full_rel, too_hard, not_nc, path.name))
    lacking = [el for el in missing if el not in candidates]
    if lacking:
        raise GenerateError(f"pseudopotentials: no PBE pseudopotential for {', '.join(lacking)} in {folder} "
                            "(Debian's quantum-espresso-data has few elements; point --pseudo-dir at e.g. the SSSP "
                            "or pslibrary files, or pass --pseudo EL=FILE)")
    for el in missing:
        chosen[el] = sorted(candidates[el])[0][-1]
    return {s: chosen[s] for s in sorted(set(symbols))}
