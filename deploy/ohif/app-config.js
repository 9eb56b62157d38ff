/** @type {AppTypes.Config} */
// OHIF 3.13 configuration for dicom-node: one DICOMweb data source, Orthanc, on the same origin.
//
// Served as /app-config.js in place of the bundle's own file, by nginx in docker compose
// (deploy/nginx/ohif.conf) and by deploy/local/ohif_proxy.py on machines without Docker. Both
// proxy /dicom-web and /wado to Orthanc, because Orthanc 1.10 sends no CORS headers, and split
// the comma-separated `includefield` values OHIF sends, which the DICOMweb plugin 1.7 ignores.
window.config = {
  name: 'dicom-node',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  // Orthanc's /dicom-web has no CORS headers and needs none here: everything is same-origin.
  showWarningMessageForCrossOrigin: false,
  // Headless and remote-desktop browsers render with the CPU; say so instead of failing silently.
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumberOfWebWorkers: 3,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'dicom-node PACS (Orthanc)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        // The proxy splits includefield, but OHIF still asks for fewer fields this way.
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
