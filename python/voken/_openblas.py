"""Which OpenBLAS kernels to ask for, decided before OpenBLAS loads.

Debian's libtorch does its float32 products in OpenBLAS (0.3.21 in Debian 12), which picks its
kernels at load time from the CPU's vendor, family and model (driver/others/dynamic.c,
get_coretype). For Intel it switches on the *base* family and, for family 6, on the extended
model; a family-6 CPU whose extended model is 11 or more (0xB0-0xFF: Raptor Lake, Lunar Lake,
Arrow Lake, Emerald Rapids, ...) matches no case and falls through to the Pentium 4 entry
("Prescott": SSE3 kernels, about a tenth of the AVX-512 speed), and so does every Intel CPU whose
family is above 15 (base family 0xF). Every other CPU, AMD's Zen 5 (family 26) included, is
either known to it or handled by its fallback, which picks by instruction set exactly as below.

So voken overrides OpenBLAS's choice only for those misdetected models, and with the name
OpenBLAS's own fallback would have chosen from the CPU's features. A user's OPENBLAS_CORETYPE
always wins. Run as a script, this prints the override (or nothing): scripts/setup.sh uses that.
"""
import os


def read_cpuinfo(path="/proc/cpuinfo"):
    """(vendor, display family, display model, flags) of the first CPU, or None off x86 Linux."""
    try:
        with open(path) as cpuinfo:
            fields = {}
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    try:
        return (fields["vendor_id"], int(fields["cpu family"]), int(fields["model"]),
                set(fields.get("flags", "").split()))
    except (KeyError, ValueError):
        return None


def misdetected_by_openblas(vendor, family, model):
    """Whether OpenBLAS 0.3.21's get_coretype() sends this CPU to its Pentium 4 kernels."""
    if vendor != "GenuineIntel":
        return False
    if family == 6:
        return (model >> 4) >= 11
    return family > 15


def kernels_for(flags):
    """The kernel set OpenBLAS's feature fallback picks for these /proc/cpuinfo flags."""
    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags
    if avx512 and "avx512_bf16" in flags:
        return "Cooperlake"
    if avx512:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    if "avx" in flags:
        return "SandyBridge"
    return None


def coretype_override(cpu=None):
    """The OPENBLAS_CORETYPE voken sets on this CPU, or None where OpenBLAS picks right."""
    cpu = read_cpuinfo() if cpu is None else cpu
    if cpu is None:
        return None
    vendor, family, model, flags = cpu
    return kernels_for(flags) if misdetected_by_openblas(vendor, family, model) else None


def apply():
    """Sets OPENBLAS_CORETYPE when OpenBLAS would misdetect this CPU and the user set nothing.
    (Without effect once OpenBLAS is loaded, e.g. after an earlier `import torch`.)"""
    if "OPENBLAS_CORETYPE" not in os.environ:
        override = coretype_override()
        if override:
            os.environ["OPENBLAS_CORETYPE"] = override


if __name__ == "__main__":
    print(coretype_override() or "")
