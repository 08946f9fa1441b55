//! The console's files, part of the binary: no build step and no network at run time.

/// A file the console serves, with its content type.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// The page every route of the client starts from.
pub const INDEX: &str = include_str!("../assets/index.html");

/// Every file under `/assets/`. uPlot (MIT, its licence beside it) draws the results' plots.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/app.js"),
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/app.css"),
    },
    Asset {
        path: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/uPlot.iife.min.js"),
    },
    Asset {
        path: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/uPlot.min.css"),
    },
    Asset {
        path: "uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../assets/uPlot.LICENSE"),
    },
];

pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}
