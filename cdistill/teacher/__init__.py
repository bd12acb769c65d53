"""Frozen teachers: the registry, the teacher stage (concept sets mapped to the student), the
student-to-teacher mapping, the offline-trained teacher and the on-disk feature cache.

Importing the package registers cdistill's own teachers (``cdistill:digits_ae``).
"""

import cdistill.teacher.offline  # noqa: F401  (registration on import)
