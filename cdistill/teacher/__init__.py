"""Frozen teachers: the registry, the teacher stage (concept sets mapped to the student), the
student-to-teacher mapping, the offline-trained teacher and the on-disk feature cache."""
