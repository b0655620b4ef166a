"""(filled in by the metrics work)"""

__all__: list = []
