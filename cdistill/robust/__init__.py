"""Group-robust training without concept images: the methods of the spurious-correlation field
(group reweighting and balanced sampling, GroupDRO, JTT, DFR, LfF; docs/methods.md §6), the one
definition of a sample's group, and the supervision each method needs."""

from cdistill.robust.groups import GroupTable, balanced_weights, group_of, num_groups, train_groups
from cdistill.robust.sampling import SamplePlan, balanced_plan
from cdistill.robust.supervision import (
    METHOD_SUPERVISION,
    SUPERVISIONS,
    Supervision,
    supervision_of,
)

__all__ = [
    "METHOD_SUPERVISION", "SUPERVISIONS", "GroupTable", "SamplePlan", "Supervision", "balanced_plan",
    "balanced_weights", "group_of", "num_groups", "supervision_of", "train_groups",
]
