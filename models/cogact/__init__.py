from models.cogact.model import CogACT

__all__ = ["CogACT"]
