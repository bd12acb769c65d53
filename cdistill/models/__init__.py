"""Networks: the student registry and factory (cdistill, timm, torchvision) and the IID net."""
