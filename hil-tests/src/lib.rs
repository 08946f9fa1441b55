//! Hardware-in-the-loop scenarios live in `tests/`; this library holds the rig file model they share.
