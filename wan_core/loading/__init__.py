"""Reading model files of every supported layout: checkpoint I/O, the table-driven key converters for foreign
formats, and the set of model files a run uses (loaded lazily)."""
