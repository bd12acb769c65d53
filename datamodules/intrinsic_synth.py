"""Deterministic synthetic scenes with known reflectance and shading: ``I = R * S``.

A scene is a height field (a sum of Gaussian bumps and dents over a plane) painted with
piecewise-constant albedo (Voronoi cells of random colours) and lit by one distant light of
colour ``c`` plus ambient light of the same colour (Lambertian, attached shadows only)::

    S = c * (ambient + (1 - ambient) * max(0, n · l))   # [3, H, W]
    I = R * S                                            # [3, H, W]

The light colour lies on a blue-orange axis (like daylight vs tungsten): ``tint`` in
``[-1, 1]`` gives ``c ∝ (1 + 0.4 tint, 1, 1 - 0.4 tint)`` scaled to a maximum of 1.

Geometry, albedo and light are drawn separately, so the same geometry can be rendered with
another material (only ``R`` changes) or under another light (only ``S`` changes): the
concept pairs of the IID experiments.

Lights are drawn from a *sector*: azimuth range (degrees, 0 = light from +x, the right of
the image, 90 = from the top), elevation range (degrees above the image plane) and tint range.
Training scenes and test scenes use different sectors, so "test scenes lit differently
from training" is a real distribution shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cdistill.errors import CdistillError


@dataclass(frozen=True)
class LightSector:
    """Where lights come from: azimuth and elevation ranges in degrees, and the range of the
    colour ``tint`` (see module doc).

    An azimuth range may wrap (``(135, 225)`` is the left side; ``(300, 420)`` is fine too).
    """

    azimuth: tuple[float, float] = (-45.0, 45.0)
    elevation: tuple[float, float] = (30.0, 60.0)
    tint: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        lo, hi = self.elevation
        if not 0 <= lo <= hi <= 90:
            raise CdistillError(f"Light elevation range {self.elevation}: need 0 <= low <= high <= 90 degrees.")
        if self.azimuth[0] > self.azimuth[1]:
            raise CdistillError(f"Light azimuth range {self.azimuth}: need low <= high (use e.g. (300, 420) to wrap).")
        if not -1 <= self.tint[0] <= self.tint[1] <= 1:
            raise CdistillError(f"Light tint range {self.tint}: need -1 <= low <= high <= 1.")


#: Training lights are warm and come from the right; the shifted test lights are cool and
#: come from the left.
TRAIN_LIGHTS = LightSector((-45.0, 45.0), (30.0, 60.0), (0.3, 1.0))
TEST_LIGHTS = LightSector((135.0, 225.0), (30.0, 60.0), (-1.0, -0.3))


@dataclass
class Scenes:
    """A batch of rendered scenes.

    Attributes:
        image: ``[N, 3, H, W]`` in ``[0, 1]``, ``image = reflectance * shading``.
        reflectance: ``[N, 3, H, W]`` in ``[0, 1]``.
        shading: ``[N, 3, H, W]`` in ``[0, 1]`` (grey times the light colour).
        normals: ``[N, 3, H, W]`` unit surface normals.
        light: ``[N, 3]`` unit light directions.
        colour: ``[N, 3]`` light colours (maximum 1).
    """

    image: Tensor
    reflectance: Tensor
    shading: Tensor
    normals: Tensor
    light: Tensor
    colour: Tensor


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in ``[0, 1]``: ``(y, x)``, each ``[H, W]``."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy, xx


def random_normals(n: int, size: int, gen: torch.Generator, bumps: int = 6, relief: float = 1.2) -> Tensor:
    """Normals of random smooth height fields (sums of Gaussian bumps and dents).

    Args:
        n: Number of scenes. size: Image side in pixels. gen: RNG.
        bumps: Gaussians per scene.
        relief: Height scale relative to the image width (larger: steeper slopes).

    Returns:
        ``[n, 3, size, size]`` unit normals (``z`` towards the viewer).
    """
    yy, xx = _grid(size)
    centre = torch.rand(n, bumps, 2, generator=gen)
    sigma = 0.06 + 0.18 * torch.rand(n, bumps, 1, 1, generator=gen)
    amp = relief * (2 * torch.rand(n, bumps, 1, 1, generator=gen) - 1)
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
    height = (amp * sigma * torch.exp(-d2 / (2 * sigma**2))).sum(1)  # [n, H, W], image-width units
    # Slopes per image width: heights are in the same units as x and y.
    dy, dx = torch.gradient(height * size, dim=(1, 2))
    normals = torch.stack([-dx, -dy, torch.ones_like(dx)], 1)
    return normals / normals.norm(dim=1, keepdim=True)


def random_albedo(n: int, size: int, gen: torch.Generator, cells: int = 8, low: float = 0.15) -> Tensor:
    """Piecewise-constant albedo: Voronoi cells of random colours.

    Args:
        n: Number of scenes. size: Image side. gen: RNG.
        cells: Voronoi seeds per scene.
        low: Smallest value of a colour channel (no black paint: ``I / S`` stays defined).

    Returns:
        ``[n, 3, size, size]`` in ``[low, 1]``.
    """
    yy, xx = _grid(size)
    seeds = torch.rand(n, cells, 2, generator=gen)
    colours = low + (1 - low) * torch.rand(n, cells, 3, generator=gen)
    d2 = (yy - seeds[..., 0, None, None]) ** 2 + (xx - seeds[..., 1, None, None]) ** 2  # [n, cells, H, W]
    owner = d2.argmin(1)  # [n, H, W]
    albedo = torch.gather(colours, 1, owner.reshape(n, -1, 1).expand(-1, -1, 3))  # [n, H*W, 3]
    return albedo.transpose(1, 2).reshape(n, 3, size, size)


def _uniform(n: int, lo_hi: tuple[float, float], gen: torch.Generator) -> Tensor:
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * torch.rand(n, generator=gen)


def random_lights(n: int, sector: LightSector, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lights uniform in the sector's azimuth, elevation and tint.

    Returns:
        ``(directions [n, 3], colours [n, 3])``: unit directions, colours with maximum 1.
    """
    az = torch.deg2rad(_uniform(n, sector.azimuth, gen))
    el = torch.deg2rad(_uniform(n, sector.elevation, gen))
    # Image rows grow downwards, so a light "from the top" has a negative y component.
    direction = torch.stack([el.cos() * az.cos(), -el.cos() * az.sin(), el.sin()], 1)
    return direction, light_colour(_uniform(n, sector.tint, gen))


def light_colour(tint: Tensor) -> Tensor:
    """Colours ``[n, 3]`` on the blue-orange axis for ``tint [n]`` in ``[-1, 1]`` (0: white)."""
    c = torch.stack([1 + 0.4 * tint, torch.ones_like(tint), 1 - 0.4 * tint], 1)
    return c / c.amax(1, keepdim=True)


def lambertian(normals: Tensor, light: Tensor, colour: Tensor, ambient: Tensor) -> Tensor:
    """Coloured Lambertian shading with ambient light.

    Args:
        normals: ``[n, 3, H, W]`` unit normals. light: ``[n, 3]`` unit directions.
        colour: ``[n, 3]`` light colours. ambient: ``[n]`` ambient fraction in ``[0, 1)``.

    Returns:
        ``[n, 3, H, W]``: ``colour * (ambient + (1 - ambient) max(0, n·l))``.
    """
    direct = (normals * light[:, :, None, None]).sum(1, keepdim=True).clamp_min(0)
    a = ambient[:, None, None, None]
    return colour[:, :, None, None] * (a + (1 - a) * direct)


def render(albedo: Tensor, normals: Tensor, light: tuple[Tensor, Tensor], ambient: Tensor) -> Scenes:
    """Compose ``I = R * S`` from the scene parts (shapes as in :class:`Scenes`; ``light`` is
    ``(directions, colours)``)."""
    shading = lambertian(normals, light[0], light[1], ambient)
    return Scenes(albedo * shading, albedo, shading, normals, light[0], light[1])


def random_ambient(n: int, gen: torch.Generator, low: float = 0.05, high: float = 0.25) -> Tensor:
    """Ambient fractions ``[n]`` uniform in ``[low, high]``."""
    return low + (high - low) * torch.rand(n, generator=gen)


def generate(n: int, size: int, sector: LightSector, gen: torch.Generator) -> Scenes:
    """Render ``n`` random scenes lit from ``sector`` (deterministic given ``gen``'s state)."""
    if n < 0 or size < 4:
        raise CdistillError(f"Cannot generate {n} scenes of {size} px (need n >= 0 and size >= 4).")
    normals = random_normals(n, size, gen)
    albedo = random_albedo(n, size, gen)
    light = random_lights(n, sector, gen)
    return render(albedo, normals, light, random_ambient(n, gen))


def complement(sector: LightSector, margin: float = 15.0, tint_margin: float = 0.1) -> LightSector:
    """Lights "different from training": azimuths outside ``sector`` (by at least ``margin``
    degrees), same elevations, tints on the far side of the sector's tint range (below it
    when there is more room there, else above it, leaving ``tint_margin``)."""
    lo, hi = sector.azimuth
    span = 360.0 - (hi - lo) - 2 * margin
    if span <= 0:
        raise CdistillError(f"Light sector {sector.azimuth} leaves no other azimuth to change the light to.")
    t_lo, t_hi = sector.tint
    below, above = t_lo - tint_margin + 1, 1 - t_hi - tint_margin
    if max(below, above) <= 0:
        tint = sector.tint  # no room: keep the tints, change the direction only
    else:
        tint = (-1.0, t_lo - tint_margin) if below >= above else (t_hi + tint_margin, 1.0)
    return LightSector((hi + margin, hi + margin + span), sector.elevation, tint)


def concept_pairs(n: int, size: int, sector: LightSector, gen: torch.Generator) -> dict[str, tuple[Tensor, Tensor]]:
    """Pairs of renders of the same geometry where only the light or only the material changes.

    ``illumination``: a scene under a light from ``sector`` (the training lights), then the
    same scene (geometry, albedo, ambient) under a light from outside it (see
    :func:`complement`); the pair is oriented "away from the training lights".
    ``material``: a scene, then the same geometry and light with a new albedo; the pair is
    ordered so that the second render has the brighter mean albedo (an orientation, so that a
    linear probe on differences has a direction to find: unordered differences are symmetric
    around zero).

    Returns:
        ``{"illumination": (before, after), "material": (before, after)}``, each image
        ``[n, 3, size, size]``.
    """
    normals = random_normals(n, size, gen)
    albedo = random_albedo(n, size, gen)
    light = random_lights(n, sector, gen)
    ambient = random_ambient(n, gen)
    base = render(albedo, normals, light, ambient).image
    relit = render(albedo, normals, random_lights(n, complement(sector), gen), ambient).image
    other = random_albedo(n, size, gen)
    repainted = render(other, normals, light, ambient).image
    brighter = other.mean((1, 2, 3)) >= albedo.mean((1, 2, 3))
    swap = brighter[:, None, None, None]
    before = torch.where(swap, base, repainted)
    after = torch.where(swap, repainted, base)
    return {"illumination": (base, relit), "material": (before, after)}


def degrees(v: Tensor) -> tuple[Tensor, Tensor]:
    """Azimuth and elevation (degrees) of unit light directions ``[n, 3]`` (inverse of
    :func:`random_lights`)."""
    az = torch.rad2deg(torch.atan2(-v[:, 1], v[:, 0]))
    el = torch.rad2deg(torch.asin(v[:, 2].clamp(-1, 1)))
    return az, el


__all__ = [
    "TEST_LIGHTS",
    "TRAIN_LIGHTS",
    "LightSector",
    "Scenes",
    "complement",
    "concept_pairs",
    "degrees",
    "generate",
    "lambertian",
    "light_colour",
    "random_albedo",
    "random_lights",
    "random_normals",
    "render",
]
